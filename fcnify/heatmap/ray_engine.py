"""The Ray engine: a Ray Data pipeline over the inputs.

The inputs (with their output names, computed by the driver over all inputs) become a dataset, and
``map_batches`` runs them in a pool of actors, each loading the converted network once (shipped as ``.pt2``
bytes through the object store, never re-converted per image) and running the local loop on its batches.
Ray itself is optional (``pip install 'fcnify[ray]'``): it is imported only when a job asks for it.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fcnify.dense import check_precision
from fcnify.errors import EngineError, ExportError, FcnifyError, InputError, first_line
from fcnify.export import ModelMetadata, save_pt2
from fcnify.heatmap.local import run_paths
from fcnify.heatmap.pipeline import HeatmapOptions, ImageJob, ModelInfo, resolve_classes
from fcnify.heatmap.summary import (
    SUMMARY_NAME,
    JobResult,
    clear_summary,
    rows_to_table,
    summary_schema,
    table_to_rows,
)
from fcnify.models import load_model
from fcnify.optional import require

__all__ = ["RayOptions", "ray_session", "require_ray", "run_ray"]

_logger = logging.getLogger(__name__)



@dataclass
class RayOptions:
    """How the Ray engine runs.

    Attributes:
        address: a Ray cluster (``host:port``, ``ray://…``, ``auto``); None: ``RAY_ADDRESS``, else a local Ray
            started for this job (bound to 127.0.0.1, no dashboard) and shut down after it.
        workers: actors in the pool, each holding one copy of the network.
        gpus_per_worker: GPUs Ray reserves for each actor (fractions share a GPU); 0: CPU only.
        cpus_per_worker: CPUs Ray reserves for each actor (Ray also caps the actor's threads to this).
        max_restarts, max_task_retries: how often Ray restarts a dead actor and retries its batch; None keeps
            Ray Data's defaults for actor pools (-1: without limit). Ray 2.60 takes these only through its
            deprecated ``**ray_remote_args``, so they are passed only when set.
    """

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_restarts: int | None = None
    max_task_retries: int | None = None

    def validate(self) -> None:
        if int(self.workers) < 1:
            raise InputError(f"--workers {self.workers} must be at least 1", hint="e.g. --workers 4")
        if not float(self.gpus_per_worker) >= 0:
            raise InputError(f"--gpus-per-worker {self.gpus_per_worker} is negative", hint="e.g. 1 or 0.5")
        if not float(self.cpus_per_worker) > 0:
            raise InputError(f"--cpus-per-worker {self.cpus_per_worker} must be positive", hint="e.g. 1")


def require_ray():
    """The ``ray`` module with Ray Data (optional: only --engine ray needs it)."""
    require("ray.data", "ray", "run --engine ray")
    return importlib.import_module("ray")


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _loopback_only() -> None:
    """Make the Ray node this process starts or joins use 127.0.0.1 and bind its servers there only.

    On Linux Ray replaces a node IP of 127.0.0.1 with the machine's routable address and listens on every
    interface; with its "single-machine" mode (what it uses on macOS and Windows) the node IP stays loopback
    and the GCS, raylet and workers bind to it. The variable is inherited by the processes Ray starts; the
    constant is set too in case ``ray`` was imported before.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:  # lazy: Ray is optional
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # pragma: no cover - a Ray without the switch
        _logger.warning("this Ray version cannot be kept to 127.0.0.1")


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None,
                num_gpus: int | None = None) -> Iterator[object]:
    """Connect to Ray for one job and disconnect after it.

    An existing connection of this process (a notebook's, a test's) is used and left open. Otherwise
    ``address`` or ``RAY_ADDRESS`` is joined (token authentication: ``RAY_AUTH_MODE=token`` and the token in
    ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``, as for any Ray client); without either, a local Ray is
    started for the job: on 127.0.0.1 only, without a dashboard, and shut down at the end.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Ray's INFO lines (cluster start, Ray Data's plan and progress) follow fcnify's level: shown with --verbose
    # only; --quiet hides Ray's warnings too.
    level = max(logging.INFO, logging.getLogger("fcnify").getEffectiveLevel())
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    kwargs: dict = {"log_to_driver": True, "configure_logging": True, "logging_level": level}
    try:
        if address:
            if _is_loopback(address):
                _loopback_only()
            ray.init(address=address, **kwargs)
        else:
            _loopback_only()
            # "local": always a new Ray of our own; without it ray.init joins a cluster that `ray start`
            # left on this machine (/tmp/ray/ray_current_cluster).
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=num_cpus,
                     num_gpus=num_gpus, **kwargs)
    except Exception as exc:
        detail = first_line(exc, 300)
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        hint = ("check the address; a cluster with token authentication needs RAY_AUTH_MODE=token and its token "
                "in RAY_AUTH_TOKEN (or ~/.ray/auth_token)") if address else "see Ray's logs in /tmp/ray"
        raise EngineError(f"cannot start or join {where}: {type(exc).__name__}: {detail}", hint=hint) from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def _ship_model(ray, fcn, loaded, model_file, workdir: Path) -> dict:
    """Put the network in the object store once, for every actor: the user's ``.pt2``/``.onnx`` bytes, else
    the converted network exported to ``.pt2``; a network torch.export cannot capture travels pickled."""
    if model_file is not None and Path(model_file).suffix in (".pt2", ".onnx"):
        path = Path(model_file)
        return {"kind": "file", "suffix": path.suffix, "ref": ray.put(path.read_bytes())}
    if getattr(loaded, "converted", False) and isinstance(loaded.extra, dict) and loaded.extra.get("path"):
        path = Path(loaded.extra["path"])  # an .onnx loaded by load_onnx_model
        return {"kind": "file", "suffix": path.suffix, "ref": ray.put(path.read_bytes())}
    try:
        target = save_pt2(fcn, ModelMetadata.of(loaded, fcn), workdir / "model.pt2")
        return {"kind": "file", "suffix": ".pt2", "ref": ray.put(target.read_bytes())}
    except (ExportError, AttributeError) as exc:
        _logger.warning("shipping the network pickled: it cannot be exported to .pt2 (%s)", exc)
        return {"kind": "module", "ref": ray.put(fcn)}


class _Predictor:
    """A Ray Data actor: loads the network once, then runs ``run_image`` on each input of its batches."""

    def __init__(self, model: dict, geometry, info: ModelInfo, options: HeatmapOptions, resume: bool,
                 trust_model: bool):
        import ray  # lazy: Ray is optional (the actor runs where it is installed)

        data = ray.get(model["ref"]) if isinstance(model["ref"], ray.ObjectRef) else model["ref"]
        if model["kind"] == "file":
            # load_model takes a path: the bytes go to a private temp file, read once and removed.
            with tempfile.TemporaryDirectory(prefix="fcnify-model-") as tmp:
                path = Path(tmp) / f"model{model['suffix']}"
                path.write_bytes(data)
                loaded = load_model(str(path), trust_model=trust_model)
            fcn, geometry = loaded.module, loaded.geometry or geometry
        else:
            fcn = data
        self.job = ImageJob(fcn, geometry, info, options)
        self.resume = resume

    def __call__(self, batch):
        paths = [str(v) for v in batch.column("path").to_pylist()]
        rows = run_paths(paths, batch.column("stem").to_pylist(), self.job, self.resume)
        return rows_to_table(rows, batch.column("index").to_pylist(), batch.column("stem").to_pylist(),
                             self.job.options.outdir)


def _cause(exc: BaseException) -> BaseException:
    """The user-level error inside a Ray error (a FcnifyError raised in an actor), if there is one."""
    seen = exc
    for _ in range(8):
        inner = getattr(seen, "cause", None) or seen.__cause__
        if inner is None or inner is seen:
            break
        seen = inner
        if isinstance(seen, FcnifyError):
            return seen
    return exc


def run_ray(paths, stems, fcn, geometry, loaded, info: ModelInfo, options, ray_options: RayOptions, resume,
             model_file, trust_model) -> JobResult:
    # What would fail in every actor fails here, once: an actor sees only the GPUs Ray gives it.
    if ray_options.gpus_per_worker == 0 and str(options.device).startswith("cuda"):
        raise InputError(f"--device {options.device} with --engine ray needs GPUs for the workers",
                         hint="pass --gpus-per-worker 1 (or a fraction), or --device cpu")
    if ray_options.gpus_per_worker == 0 and options.precision == "fp16":
        check_precision("fp16", torch.device("cpu"))
    resolve_classes(options.classes, info.labels)  # an unknown class: fail before starting Ray
    outdir_given = Path(options.outdir)
    outdir = Path(os.path.abspath(outdir_given))
    outdir.mkdir(parents=True, exist_ok=True)
    worker_options = replace(options, outdir=outdir)
    need_cpus = max(1, math.ceil(ray_options.workers * ray_options.cpus_per_worker))
    with ray_session(ray_options.address, num_cpus=max(need_cpus, os.cpu_count() or 1)) as ray, \
            tempfile.TemporaryDirectory(prefix="fcnify-ray-") as tmp:
        import ray.data  # lazy: Ray is optional

        model = _ship_model(ray, fcn, loaded, model_file, Path(tmp))
        items = [{"index": i, "path": p, "stem": s}
                 for i, (p, s) in enumerate(zip(paths, stems, strict=True))]
        # About one block per batch, and at least one per actor, so that every actor gets work.
        blocks = max(1, min(len(items), max(ray_options.workers, math.ceil(len(items) / options.batch_size))))
        # A dead actor is restarted and its batch retried: Ray Data's actor pools do so by default.
        retries = {name: value for name, value in (("max_restarts", ray_options.max_restarts),
                                                   ("max_task_retries", ray_options.max_task_retries))
                   if value is not None}
        start = time.perf_counter()
        try:
            ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                _Predictor,
                fn_constructor_kwargs={"model": model, "geometry": geometry, "info": info,
                                       "options": worker_options, "resume": resume, "trust_model": trust_model},
                batch_size=options.batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=ray_options.workers),
                num_cpus=ray_options.cpus_per_worker, num_gpus=ray_options.gpus_per_worker or None,
                **retries,
            )
            done = ds.materialize()
            seconds = time.perf_counter() - start
            summary_path = outdir / SUMMARY_NAME
            clear_summary(summary_path)
            # Ray Data's own writer: a folder of Parquet files (one here, all rows being few and small).
            done.write_parquet(str(summary_path), min_rows_per_file=max(1, len(items)))
            import pyarrow as pa  # lazy: heavy (see summary.py)

            table = pa.concat_tables(ray.get(done.to_arrow_refs())) if items else summary_schema().empty_table()
        except FcnifyError:
            raise
        except Exception as exc:
            cause = _cause(exc)
            if isinstance(cause, FcnifyError):
                raise cause from exc
            detail = (str(exc).strip().splitlines() or [""])[-1][:300]
            raise EngineError(f"the Ray job failed: {type(exc).__name__}: {detail}",
                              hint="see the Ray output above; rerun the same command with --resume to go on") from exc
        context = ray.get_runtime_context()
        cluster = {"address": context.gcs_address,
                   "nodes": sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive")),
                   "node_ips": sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})}
    _, rows = table_to_rows(table, outdir_given)
    processed = sum(1 for row in rows if not row.skipped)
    return JobResult(rows, "ray", seconds, processed, outdir_given / SUMMARY_NAME, cluster)
