"""Where the cells of an experiment run: here, one after the other, or as Ray tasks.

An executor has `open(exp, todo)`, a context manager that gets ready (loads the model, or joins a
cluster) and checks what it can before the experiment folder is written, and `run(exp, todo, progress)`,
which runs each cell as an ordinary `Aligner` and records `state.outcome` ({status: finished | failed |
timeout, error, result}).

- `LocalExecutor`: one process. The backend loads once; every cell's `Aligner` is built before the first
  runs, so settings the model refuses (a `dim` above tokens x hidden, ...) fail before anything is written.
- `RayExecutor`: one Ray task per cell. It joins a cluster by address, or starts a local one with
  `num_cpus`. Each task loads the backend itself (once per worker process) and asks for a GPU when the
  cluster has any. Tasks in flight are bounded by the cluster's slots, so a `cell_timeout` counts from a
  cell's start (model load included); a cell past it is cancelled, and its checkpoint stays for the next
  run. The package travels to the workers as a Ray `py_modules` entry, so they run this version of
  culturalign. Cell folders are written by the workers: on a multi-machine cluster `--out` must be on a
  shared filesystem for resume (the results come back to the driver either way).

Ray is imported only here, inside `RayExecutor.open`, so culturalign works without it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from culturalign.errors import CulturalignError

EXECUTORS = ("local", "ray")


def _failure(e: BaseException) -> dict:
    if isinstance(e, CulturalignError):
        return {"status": "failed", "error": str(e)}
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return {"status": "failed", "error": f"{type(e).__name__}: {first}"[:500]}


class LocalExecutor:
    name = "local"

    def __init__(self, device: str | None = None, backend=None):
        self.device, self.backend, self.aligners = device, backend, {}

    @contextlib.contextmanager
    def open(self, exp, todo):
        from culturalign.alignment.run import Aligner
        from culturalign.backends import load_backend

        if self.backend is None:
            self.backend = load_backend(exp.model, device=self.device)
        self.aligners = {}
        for s in todo:
            try:
                self.aligners[s.cell.name] = Aligner(self.backend, exp.instrument, s.cell.target, s.cell.config, s.out,
                                                     resume=s.resume)
            except CulturalignError as e:
                raise CulturalignError(f"{exp.path}: cell {s.cell.name}: {e}") from None
        yield self

    def run(self, exp, todo, progress) -> None:
        for s in todo:
            aligner = self.aligners.pop(s.cell.name)
            aligner.progress = lambda info, s=s: progress("progress", s, info)
            progress("start", s, {"evaluations": s.evaluations, "budget": s.cell.budget})
            try:
                s.outcome = {"status": "finished", "result": aligner.run()}
            except CulturalignError as e:
                s.outcome = _failure(e)
            progress("finish", s, s.outcome)


# ---- Ray --------------------------------------------------------------------------------------------------

_WORKER_BACKENDS: dict = {}  # per Ray worker process: (model, device) -> backend


def run_cell_task(model: str, device: str | None, instrument, target, config, out: str, resume: bool) -> dict:
    """One cell in a Ray worker: load (or reuse) the backend, run the Aligner, return the outcome."""
    try:
        from culturalign.alignment.run import Aligner
        from culturalign.backends import load_backend

        key = (model, device)
        if key not in _WORKER_BACKENDS:
            _WORKER_BACKENDS.clear()  # one model per worker
            _WORKER_BACKENDS[key] = load_backend(model, device=device)
        result = Aligner(_WORKER_BACKENDS[key], instrument, target, config, out, resume=resume).run()
        return {"status": "finished", "result": result}
    except Exception as e:  # returned, not raised: the driver reports it as the cell's failure, in one line
        return _failure(e)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, device: str | None = None,
                 cell_timeout: float | None = None, poll_seconds: float = 1.0, init_options: dict | None = None):
        if num_cpus is not None and num_cpus < 1:
            raise CulturalignError(f"--num-cpus must be at least 1, got {num_cpus}")
        if num_cpus is not None and address is not None:
            raise CulturalignError("--num-cpus starts a local Ray cluster; it cannot be given with --address")
        if cell_timeout is not None and not cell_timeout > 0:
            raise CulturalignError(f"--cell-timeout must be a number of seconds > 0, got {cell_timeout}")
        self.address, self.num_cpus, self.device = address, num_cpus, device
        self.cell_timeout, self.poll, self.init_options = cell_timeout, poll_seconds, init_options or {}
        self.ray, self.gpus, self.slots, self.started, self.task = None, 0, 1, False, None

    @staticmethod
    def available() -> None:
        """One clear line when Ray is not installed."""
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise CulturalignError("--executor ray needs Ray: pip install 'culturalign[ray]' (or pip install 'ray[default]')")

    @contextlib.contextmanager
    def open(self, exp, todo):
        self.available()
        if self.address is None:  # a local cluster shares this filesystem: a missing model folder fails here, once
            model = Path(exp.model).expanduser()
            if exp.model.startswith((".", "/", "~")) and not model.is_dir():
                raise CulturalignError(f"model directory {exp.model!r} does not exist")
        import culturalign
        import ray

        self.ray = ray
        runtime_env = {"py_modules": [str(Path(culturalign.__file__).parent)]}
        if not ray.is_initialized():
            opts = {"configure_logging": False, "log_to_driver": False, "runtime_env": runtime_env, **self.init_options}
            if self.address is None:
                env = {k: os.environ[k] for k in ("CULTURALIGN_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "XDG_CACHE_HOME")
                       if k in os.environ}
                if env:
                    runtime_env["env_vars"] = env
                opts.update(num_cpus=self.num_cpus, include_dashboard=False)
            else:
                opts["address"] = self.address
            try:
                ray.init(**opts)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray cluster"
                hint = ("; check the address, and for a cluster with token authentication set RAY_AUTH_MODE=token "
                        "and its token (RAY_AUTH_TOKEN)") if self.address else ""
                raise CulturalignError(f"--executor ray: could not start or join {where} ({first[:300]}){hint}") from None
            self.started = True
        try:
            res = ray.cluster_resources()
            self.gpus = int(res.get("GPU", 0))
            self.slots = max(1, self.gpus if self.gpus else int(res.get("CPU", 1)))
            yield self
        finally:
            self.task = None
            if self.started:
                ray.shutdown()
                self.started = False

    def _submit(self, exp, s):
        if self.task is None:
            self.task = self.ray.remote(run_cell_task).options(num_cpus=1, num_gpus=1 if self.gpus else 0, max_retries=0)
        return self.task.remote(exp.model, self.device, exp.instrument, s.cell.target, s.cell.config, str(s.out.resolve()),
                           s.resume)

    def _poll_progress(self, running, progress) -> None:
        from culturalign.alignment.run import read_checkpoint

        for s, _ in running.values():
            if (s.out / "checkpoint.json").is_file():
                try:
                    h = read_checkpoint(s.out)["history"][-1]
                except CulturalignError:
                    continue
                progress("progress", s, {**h, "budget": s.cell.budget})

    def run(self, exp, todo, progress) -> None:
        ray = self.ray
        queue, running = list(todo), {}  # ref -> (state, started)
        try:
            while queue or running:
                while queue and len(running) < self.slots:
                    s = queue.pop(0)
                    running[self._submit(exp, s)] = (s, time.monotonic())
                    progress("start", s, {"evaluations": s.evaluations, "budget": s.cell.budget})
                ready, _ = ray.wait(list(running), num_returns=1, timeout=self.poll)
                for ref in ready:
                    s, _ = running.pop(ref)
                    try:
                        s.outcome = ray.get(ref)
                    except Exception as e:  # the worker died, or the task could not start
                        s.outcome = _failure(e)
                    progress("finish", s, s.outcome)
                now = time.monotonic()
                for ref, (s, t0) in list(running.items()):
                    if self.cell_timeout is not None and now - t0 > self.cell_timeout:
                        ray.cancel(ref, force=True)
                        running.pop(ref)
                        s.outcome = {"status": "timeout",
                                     "error": f"still running after --cell-timeout {self.cell_timeout:g} s; cancelled, "
                                              "its checkpoint is kept"}
                        progress("finish", s, s.outcome)
                self._poll_progress(running, progress)
        except KeyboardInterrupt:
            for ref in running:
                ray.cancel(ref, force=True)
            raise


def make_executor(name: str, address: str | None = None, num_cpus: int | None = None, device: str | None = None,
                  cell_timeout: float | None = None):
    """The executor named by --executor, its options checked (Ray's presence included) before any work."""
    if name not in EXECUTORS:
        raise CulturalignError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}")
    if name == "local":
        given = [flag for flag, v in (("--address", address), ("--num-cpus", num_cpus), ("--cell-timeout", cell_timeout))
                 if v is not None]
        if given:
            raise CulturalignError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --executor ray only")
        return LocalExecutor(device=device)
    RayExecutor.available()
    return RayExecutor(address=address, num_cpus=num_cpus, device=device, cell_timeout=cell_timeout)
