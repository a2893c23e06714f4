"""Multi-process start-up: `jax.distributed.initialize` when the launch has several processes.

A plain single-host run never initialises (big_vision's SigLIP trainer crashes there because it
always does). A multi-process launch is recognised from its environment:
  explicit   JAXCLIP_COORDINATOR (host:port), JAXCLIP_NUM_PROCESSES, JAXCLIP_PROCESS_ID
             (what `launch/local.sh` and the tests set; optional JAXCLIP_LOCAL_DEVICE_IDS)
  SLURM      SLURM_NTASKS > 1 inside a job step: JAX reads the SLURM variables itself
  TPU pod    TPU_WORKER_HOSTNAMES with more than one host: JAX asks the TPU metadata server
  JAX's own  JAX_COORDINATOR_ADDRESS (Kubernetes/JobSet launchers set it)
  forced     JAXCLIP_DISTRIBUTED=1: initialise and let JAX detect the cluster. A Cloud TPU VM pod
             slice needs it: its workers learn the slice from the GCE metadata server and have
             none of the variables above (`launch/tpu_qr.sh` sets it). JAXCLIP_DISTRIBUTED=0
             never initialises, whatever the environment says.
On CPU, multi-process runs use gloo collectives. This must run before anything touches devices.

Multi-process CPU runs never use the persistent compilation cache (`cpu_compilation_cache_off`):
with jaxlib 0.12.1 a gloo program that process 0 loads from the cache while the other processes
compile it hangs in its first collective: every device of every process waits inside the same
`gloo::allgather`, forever, without an error. Only process 0 ever hits (the processes' cache keys
differ on CPU, and only process 0 writes), so every rerun of a multi-process CPU job with a warm
cache could hang. Measured with a 2-process x 4-device program of two all-gathers: 5 of 5 runs on
a warm cache hung, 0 of 5 on a cold one, 0 of 5 warm ones on jaxlib 0.10.2 (launch/README.md);
`test_a_warm_compilation_cache_does_not_hang_a_job` keeps it fixed. Nothing is lost by it: the
processes other than 0 compile anyway, and the first collective waits for the slowest of them.
"""

from __future__ import annotations

import logging
import os

import jax

_initialized = False


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def launch_kind(env=os.environ) -> str | None:
    forced = env.get("JAXCLIP_DISTRIBUTED", "").strip().lower()
    if forced and forced not in _ON + _OFF:
        raise ValueError(f"JAXCLIP_DISTRIBUTED={env['JAXCLIP_DISTRIBUTED']!r}: use 1 (initialise "
                         "jax.distributed, detecting the cluster) or 0 (never initialise)")
    if forced in _OFF:
        return None
    if env.get("JAXCLIP_COORDINATOR"):
        return "explicit"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_STEP_ID") is not None:
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return "tpu"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "jax_env"
    if forced in _ON:
        return "forced"
    return None


def maybe_initialize(env=os.environ) -> bool:
    """Initialises JAX's distributed runtime if the environment says this is one of several
    processes; returns whether it did."""
    global _initialized
    if _initialized:
        return True
    kind = launch_kind(env)
    if kind is None:
        return False
    if env.get("JAX_PLATFORMS", "") == "cpu" or env.get("JAXCLIP_CPU_COLLECTIVES"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if kind == "explicit":
        local = env.get("JAXCLIP_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=env["JAXCLIP_COORDINATOR"],
            num_processes=int(env["JAXCLIP_NUM_PROCESSES"]),
            process_id=int(env["JAXCLIP_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
        )
    else:
        jax.distributed.initialize()  # auto-detects SLURM, Cloud TPU (VM and GKE), Kubernetes
    _initialized = True
    cpu_compilation_cache_off()
    logging.info("distributed (%s): process %d of %d, %d local / %d global devices", kind,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def cpu_compilation_cache_off() -> bool:
    """Turns the persistent compilation cache off in a multi-process CPU job (see the module
    docstring for the hang it prevents); returns whether it did. Must run before the first
    compilation: JAX decides once, at its first compile, whether the cache is used."""
    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return False
    if jax.config.jax_enable_compilation_cache:
        logging.info("multi-process CPU job: persistent compilation cache off (gloo programs "
                     "loaded from it hang with jaxlib 0.12; see jaxclip/distributed.py)")
    jax.config.update("jax_enable_compilation_cache", False)
    return True
