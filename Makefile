# The two set-up commands of the README. Both work on a fresh machine with Python >= 3.11.
PYTHON ?= python3

.PHONY: demo test

demo:  ## install jaxclip into .venv and train the demo (6-16 minutes on 2 CPU cores)
	$(PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q -e .
	.venv/bin/jaxclip train --config configs/demo.py --workdir runs/demo

test:  ## fresh environments for Python 3.11 and 3.12, then ruff and the whole test suite
	tools/test.sh
