"""Config loading, command-line overrides and their error paths."""

import textwrap

import pytest

from jaxclip import config


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(textwrap.dedent('''
        import ml_collections

        def get_config(arg=None):
            c = ml_collections.ConfigDict()
            c.model = dict(name="ViT-Ti-8-64")
            c.train = dict(steps=int(arg) if arg else 10, batch_size=16)
            c.evals = dict(val=dict(type="retrieval", split="val"))
            return c
    '''))
    return str(path)


def test_file_merges_onto_defaults_and_model_name_fills_sizes(cfg_file):
    cfg = config.load(cfg_file)
    assert cfg.train.steps == 10 and cfg.train.batch_size == 16
    assert cfg.train.log_every == config.defaults().train.log_every  # untouched default
    assert cfg.model.image.image_size == 64 and cfg.model.text.context_length == 32
    assert cfg.evals.val.type == "retrieval"  # open section kept as written


def test_arg_is_passed_to_get_config(cfg_file):
    assert config.load(cfg_file + ":25").train.steps == 25


def test_overrides_parse_by_type(cfg_file):
    cfg = config.load(cfg_file, ["train.steps=200", "model.text.width=64", "optim.lr=1e-3",
                                 "model.scan_layers=false", "optim.frozen=['^image/']",
                                 "model.dtype=bfloat16", "optim.warmup_steps=5"])
    assert cfg.train.steps == 200 and cfg.model.text.width == 64
    assert cfg.optim.lr == 1e-3 and cfg.model.scan_layers is False
    assert list(cfg.optim.frozen) == ["^image/"] and cfg.model.dtype == "bfloat16"


def test_explicit_keys_win_over_model_name(tmp_path):
    path = tmp_path / "e.py"
    path.write_text("def get_config():\n    return {'model': {'name': 'ViT-B-32', "
                    "'text': {'width': 256, 'heads': 4}}}\n")
    cfg = config.load(str(path))
    assert cfg.model.image.patch_size == 32 and cfg.model.text.width == 256
    cfg = config.load(str(path), ["model.name=ViT-B-16"])
    assert cfg.model.image.patch_size == 16


@pytest.mark.parametrize("override, message", [
    ("model.text.widht=3", "unknown config key 'model.text.widht'; did you mean 'model.text.width'"),
    ("train.steps=abc", "config key 'train.steps' expects int, got str"),
    ("train.steps=1.5", "config key 'train.steps' expects int, got float"),
    ("model.scan_layers=maybe", "config key 'model.scan_layers' expects bool"),
    ("model.image=3", "is a section"),
    ("train.steps", "must look like key=value"),
    ("model.image.pool=max", "must be one of"),
    ("train.batch_size=0", "must be positive"),
    ("data.views=0", "'data.views' must be positive"),
    ("data.view_augment.scale=(0.5, 1.5)", "data.view_augment needs 0 < scale"),
    ("model.image.view_head.depth=0", "model.image.view_head needs out >= 0"),
])
def test_bad_overrides_name_the_key(cfg_file, override, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(cfg_file, [override])


def test_unknown_key_in_a_config_file_is_an_error(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("def get_config():\n    return {'optim': {'learning_rate': 0.1}}\n")
    with pytest.raises(config.ConfigError, match="unknown config key 'optim.learning_rate'"):
        config.load(str(path))


def test_missing_file_and_missing_get_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        config.load(str(tmp_path / "nope.py"))
    path = tmp_path / "empty.py"
    path.write_text("x = 1\n")
    with pytest.raises(config.ConfigError, match="defines no get_config"):
        config.load(str(path))


def test_unknown_model_name(cfg_file):
    with pytest.raises(KeyError, match="unknown model.name 'ViT-Z-99'"):
        config.load(cfg_file, ["model.name=ViT-Z-99"])


def test_round_trip_through_json(cfg_file):
    import json

    cfg = config.load(cfg_file, ["train.steps=7"])
    again = config.from_dict(json.loads(config.to_json(cfg)))
    assert again.to_dict() == cfg.to_dict()


def test_a_loaded_config_is_locked_except_its_open_sections(cfg_file):
    cfg = config.load(str(cfg_file))
    cfg.train.steps = 7  # existing keys stay writable
    with pytest.raises(AttributeError, match="stepz"):
        cfg.train.stepz = 7  # a typo cannot create a key that nothing reads
    cfg.evals.extra = dict(type="retrieval")  # user-chosen keys
    cfg.optim.lr_mults["^text/"] = 0.1
    assert config.from_dict(cfg.to_dict()).train.steps == 7


def test_old_flat_loss_keys_keep_their_meaning(cfg_file):
    cfg = config.load(str(cfg_file), ["loss.label_smoothing=0.1", "loss.direction_reduce=sum"])
    assert cfg.loss.clip.label_smoothing == 0.1 and cfg.loss.clip.direction_reduce == "sum"
    stored = config.from_dict({"loss": {"label_smoothing": 0.2}})  # an old config.json
    assert stored.loss.clip.label_smoothing == 0.2
    with pytest.raises(config.ConfigError, match="loss.clip.direction_reduce"):
        config.load(str(cfg_file), ["loss.clip.direction_reduce=max"])
