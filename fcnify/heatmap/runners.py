"""Heatmap jobs over many images: the local loop, the Ray Data engine, ``--resume`` and ``summary.parquet``.

Both engines run ``pipeline.run_image`` on each input, so a job gives the same files whichever engine runs it.
What differs is only who calls it:

* ``local``: this process, image after image, on its own device;
* ``ray``: a Ray Data pipeline — the inputs (with their output names, computed here over all inputs) become a
  dataset, and ``map_batches`` runs them in a pool of actors, each loading the converted network once
  (shipped as ``.pt2`` bytes through the object store, never re-converted per image).

Both write ``OUTDIR/summary.parquet`` (``summary_schema``): a single file from the local engine, a folder of
Parquet files from Ray Data's writer; ``pyarrow.parquet.read_table`` reads either as one table. Rows come in
completion order: sort by ``index`` for input order. With ``resume``, an image whose outputs are complete is
not redone (its row has ``skipped`` set), and a slide whose store is partial goes on from its finished tiles.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from fcnify.atomic import temp_beside
from fcnify.errors import FcnifyError, InputError, OutputError
from fcnify.heatmap.pipeline import (
    ClassPeak,
    HeatmapOptions,
    ImageJob,
    ModelInfo,
    SummaryRow,
    TileProgress,
    output_stems,
    resolve_classes,
    run_image,
)

__all__ = [
    "ENGINES", "JobResult", "RayOptions", "SUMMARY_NAME", "read_summary", "run_job", "summary_schema",
    "write_summary",
]

_logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
SUMMARY_NAME = "summary.parquet"
RAY_HINT = "pip install 'fcnify[ray]'"


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


@dataclass
class JobResult:
    """A finished job.

    Attributes:
        rows: one per input, in input order (``outputs`` as paths under the outdir given).
        engine: ``local`` or ``ray``.
        seconds: time spent on the images (not loading the model or starting Ray).
        processed: inputs run (not skipped); ``images_per_second`` counts these.
        summary: the ``summary.parquet`` written (None when pyarrow is missing).
        cluster: for Ray, ``{"address": GCS address, "nodes": [node ids], "node_ips": […]}``.
    """

    rows: list[SummaryRow]
    engine: str
    seconds: float
    processed: int
    summary: Path | None = None
    cluster: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[SummaryRow]:
        return [row for row in self.rows if row.status != "ok"]

    @property
    def skipped(self) -> int:
        return sum(1 for row in self.rows if row.skipped)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")


def _source(path: str) -> str:
    """Where a worker reads an input: URIs as given, local paths made absolute (a Ray worker's working
    directory is not the driver's)."""
    return path if "://" in path else os.path.abspath(path)


def run_paths(paths: Sequence[str], stems: Sequence[str], job: ImageJob, resume: bool = False,
              progress: Callable[[TileProgress], None] | None = None,
              finished: Callable[[SummaryRow], None] | None = None) -> list[SummaryRow]:
    """``run_image`` for each input, in order; one row each (a bad input is an error row, the loop goes on)."""
    rows = []
    for path, stem in zip(paths, stems, strict=True):
        row = run_image(_source(path), stem, job, resume, progress)
        row.path = str(path)  # the input as given, whichever absolute path was read
        rows.append(row)
        if finished is not None:
            finished(row)
    return rows


# ---------------------------------------------------------------------------------------------- summary


def summary_schema():
    """The Arrow schema of ``summary.parquet`` (both engines): one row per input.

    ``top`` is the top-k classes by peak probability, best first: class index, label, peak probability and
    the peak cell's window centre (y, x) in level-0 pixels. ``outputs`` are relative to OUTDIR. The tile
    columns count the image's tiles: computed now, skipped as background, and done by an earlier run.
    """
    import pyarrow as pa

    peak = pa.struct([("class_index", pa.int32()), ("label", pa.string()), ("score", pa.float64()),
                      ("y", pa.float64()), ("x", pa.float64())])
    return pa.schema([
        ("index", pa.int64()), ("path", pa.string()), ("stem", pa.string()), ("status", pa.string()),
        ("skipped", pa.bool_()), ("error", pa.string()),
        ("image_height", pa.int64()), ("image_width", pa.int64()),
        ("map_height", pa.int64()), ("map_width", pa.int64()), ("padded", pa.bool_()),
        ("top", pa.list_(peak)), ("outputs", pa.list_(pa.string())),
        ("level", pa.int64()), ("downsample", pa.float64()), ("mpp", pa.float64()),
        ("tiles", pa.int64()), ("tiles_computed", pa.int64()), ("tiles_background", pa.int64()),
        ("tiles_resumed", pa.int64()), ("background_fraction", pa.float64()), ("seconds", pa.float64()),
        ("megapixels", pa.float64()), ("runtime", pa.string()), ("scores_format", pa.string()),
        ("mean", pa.list_(pa.float64())), ("std", pa.list_(pa.float64())),
        ("preprocessing_source", pa.string()),
    ])


def _relative(path: str, outdir: Path) -> str:
    try:
        return Path(path).relative_to(outdir).as_posix()
    except ValueError:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(outdir)).as_posix()


_COUNTS = ("level", "downsample", "mpp", "tiles", "tiles_computed", "tiles_background", "tiles_resumed",
           "background_fraction", "seconds", "megapixels", "runtime", "scores_format")


def rows_to_table(rows: Sequence[SummaryRow], indices: Sequence[int], stems: Sequence[str], outdir):
    """Summary rows as a ``pyarrow.Table`` of ``summary_schema``."""
    import pyarrow as pa

    outdir = Path(outdir)
    columns: dict[str, list] = {name: [] for name in summary_schema().names}
    for row, index, stem in zip(rows, indices, stems, strict=True):
        image = row.image_size or (None, None)
        cells = row.map_size or (None, None)
        values = {
            "index": int(index), "path": row.path, "stem": stem, "status": row.status, "skipped": bool(row.skipped),
            "error": row.error, "image_height": image[0], "image_width": image[1], "map_height": cells[0],
            "map_width": cells[1], "padded": bool(row.padded),
            "top": [{"class_index": p.index, "label": p.label, "score": float(p.score), "y": float(p.y),
                     "x": float(p.x)} for p in row.top],
            "outputs": [_relative(p, outdir) for p in row.outputs],
            **{name: getattr(row, name) for name in _COUNTS},
            "mean": list(row.preprocessing.get("mean") or []) or None,
            "std": list(row.preprocessing.get("std") or []) or None,
            "preprocessing_source": row.preprocessing.get("source"),
        }
        for name, value in values.items():
            columns[name].append(value)
    return pa.table(columns, schema=summary_schema())


def table_to_rows(table, outdir) -> tuple[list[int], list[SummaryRow]]:
    """(indices, rows) of a summary table, sorted by index; ``outputs`` joined onto ``outdir``."""
    records = sorted(table.to_pylist(), key=lambda r: r["index"])
    rows = []
    for r in records:
        size = (r["image_height"], r["image_width"]) if r["image_height"] is not None else None
        cells = (r["map_height"], r["map_width"]) if r["map_height"] is not None else None
        top = tuple(ClassPeak(p["class_index"], p["label"], p["score"], p["y"], p["x"]) for p in r["top"] or [])
        counts = {name: r[name] for name in _COUNTS if r.get(name) is not None}
        rows.append(SummaryRow(path=r["path"], status=r["status"], error=r["error"], image_size=size,
                               map_size=cells, padded=bool(r["padded"]), top=top,
                               outputs=tuple(str(Path(outdir) / p) for p in r["outputs"] or []),
                               skipped=bool(r["skipped"]), **counts,
                               preprocessing={"mean": r["mean"], "std": r["std"], "source": r["preprocessing_source"]}))
    return [r["index"] for r in records], rows


def _clear_summary(target: Path) -> None:
    """Remove an earlier summary: a file, or a folder of Parquet files (Ray's writer); nothing else."""
    if target.is_dir():
        foreign = [p.name for p in target.iterdir() if not (p.name.endswith(".parquet") or p.name.startswith("."))]
        if foreign:
            raise OutputError(f"{target} is a folder holding other files ({', '.join(foreign[:3])})",
                              hint="move it away: fcnify writes the job's summary there")
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


def write_summary(table, outdir) -> Path:
    """Write ``OUTDIR/summary.parquet`` as one file, atomically (replacing an earlier file or folder)."""
    import pyarrow.parquet as pq

    target = Path(outdir) / SUMMARY_NAME
    tmp = temp_beside(target)
    try:
        pq.write_table(table, tmp)
        _clear_summary(target)
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}", hint="check the output folder") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def read_summary(outdir):
    """``OUTDIR/summary.parquet`` (a file or Ray's folder of files) as one table, sorted by ``index``."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(outdir) / SUMMARY_NAME, schema=summary_schema())
    return table.sort_by("index")


# ------------------------------------------------------------------------------------------------- jobs


def run_job(paths: Sequence[str], fcn, geometry, loaded, options: HeatmapOptions, engine: str = "local",
            ray_options: RayOptions | None = None, resume: bool = False,
            progress: Callable[[TileProgress], None] | None = None,
            finished: Callable[[SummaryRow], None] | None = None, model_file: str | os.PathLike | None = None,
            trust_model: bool = False, metadata=None) -> JobResult:
    """Heatmaps for every input with the chosen engine, and ``OUTDIR/summary.parquet``.

    Args:
        paths: inputs (local paths or URIs pyarrow reads).
        fcn, geometry: the converted network and its geometry.
        loaded: the ``LoadedModel`` (for ``in_chans``, ``mean``, ``std``, ``labels``, ``source``).
        options: the heatmap options.
        engine: ``local`` or ``ray``.
        ray_options: the Ray engine's options.
        resume: skip inputs whose outputs are complete; go on with partial slide stores.
        progress: called after each tile of each image (local engine; Ray shows its own progress bars).
        finished: called with each input's row once it is done (local engine).
        model_file: the ``.pt2``/``.onnx`` the network came from, shipped to Ray workers as it is.
        trust_model: the workers may load a ``.pt2`` holding pickles or compiled code (as on the driver).
        metadata: the network's ``ModelMetadata`` (lets ``--runtime`` export it to ONNX in memory).

    Raises:
        InputError: bad options, an unknown engine; FcnifyError: Ray missing or failing as a whole.
    """
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}", hint="use --engine local or --engine ray")
    options.validate()
    paths = [str(p) for p in paths]
    stems = output_stems(paths)  # once, over all inputs: every engine and worker uses the same names
    model = ModelInfo.of(loaded)
    if engine == "local":
        job = ImageJob(fcn, geometry, model, options, metadata)
        start = time.perf_counter()
        rows = run_paths(paths, stems, job, resume, progress, finished)
        seconds = time.perf_counter() - start
        summary = write_summary(rows_to_table(rows, range(len(rows)), stems, options.outdir), options.outdir)
        return JobResult(rows, "local", seconds, sum(1 for row in rows if not row.skipped), summary)
    ray_options = ray_options or RayOptions()
    ray_options.validate()
    return _run_ray(paths, stems, fcn, geometry, loaded, model, options, ray_options, resume, model_file,
                    trust_model)


# -------------------------------------------------------------------------------------------------- Ray


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise FcnifyError(f"--engine ray needs Ray Data, which is not installed ({exc.name or exc})",
                          hint=RAY_HINT) from exc
    return ray


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
    try:
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
        detail = (str(exc).splitlines() or [""])[0][:300]
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        hint = ("check the address; a cluster with token authentication needs RAY_AUTH_MODE=token and its token "
                "in RAY_AUTH_TOKEN (or ~/.ray/auth_token)") if address else "see Ray's logs in /tmp/ray"
        raise FcnifyError(f"cannot start or join {where}: {type(exc).__name__}: {detail}", hint=hint) from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def _ship_model(ray, fcn, loaded, model_file, workdir: Path) -> dict:
    """Put the network in the object store once, for every actor: the user's ``.pt2``/``.onnx`` bytes, else
    the converted network exported to ``.pt2``; a network torch.export cannot capture travels pickled."""
    from fcnify.errors import ExportError

    if model_file is not None and Path(model_file).suffix in (".pt2", ".onnx"):
        path = Path(model_file)
        return {"kind": "file", "suffix": path.suffix, "ref": ray.put(path.read_bytes())}
    if getattr(loaded, "converted", False) and isinstance(loaded.extra, dict) and loaded.extra.get("path"):
        path = Path(loaded.extra["path"])  # an .onnx loaded by load_onnx_model
        return {"kind": "file", "suffix": path.suffix, "ref": ray.put(path.read_bytes())}
    try:
        from fcnify.export import ModelMetadata, save_pt2

        metadata = ModelMetadata(tuple(fcn.input_size), int(fcn.in_chans), tuple(loaded.mean), tuple(loaded.std),
                                 tuple(str(v) for v in loaded.labels), fcn.geometry, loaded.source,
                                 normalisation=getattr(loaded, "normalisation", None) or "")
        target = save_pt2(fcn, metadata, workdir / "model.pt2")
        return {"kind": "file", "suffix": ".pt2", "ref": ray.put(target.read_bytes())}
    except (ExportError, AttributeError) as exc:
        _logger.warning("shipping the network pickled: it cannot be exported to .pt2 (%s)", exc)
        return {"kind": "module", "ref": ray.put(fcn)}


class _Predictor:
    """A Ray Data actor: loads the network once, then runs ``run_image`` on each input of its batches."""

    def __init__(self, model: dict, geometry, info: ModelInfo, options: HeatmapOptions, resume: bool,
                 trust_model: bool):
        import ray

        data = ray.get(model["ref"]) if isinstance(model["ref"], ray.ObjectRef) else model["ref"]
        if model["kind"] == "file":
            from fcnify.models import load_model

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


def _run_ray(paths, stems, fcn, geometry, loaded, info: ModelInfo, options, ray_options: RayOptions, resume,
             model_file, trust_model) -> JobResult:
    import torch

    from fcnify.dense import check_precision

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
        import ray.data

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
            _clear_summary(summary_path)
            # Ray Data's own writer: a folder of Parquet files (one here, all rows being few and small).
            done.write_parquet(str(summary_path), min_rows_per_file=max(1, len(items)))
            import pyarrow as pa

            table = pa.concat_tables(ray.get(done.to_arrow_refs())) if items else summary_schema().empty_table()
        except FcnifyError:
            raise
        except Exception as exc:
            cause = _cause(exc)
            if isinstance(cause, FcnifyError):
                raise cause from exc
            detail = (str(exc).strip().splitlines() or [""])[-1][:300]
            raise FcnifyError(f"the Ray job failed: {type(exc).__name__}: {detail}",
                              hint="see the Ray output above; rerun the same command with --resume to go on") from exc
        context = ray.get_runtime_context()
        cluster = {"address": context.gcs_address,
                   "nodes": sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive")),
                   "node_ips": sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})}
    _, rows = table_to_rows(table, outdir_given)
    processed = sum(1 for row in rows if not row.skipped)
    return JobResult(rows, "ray", seconds, processed, outdir_given / SUMMARY_NAME, cluster)
