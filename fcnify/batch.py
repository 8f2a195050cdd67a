"""Heatmap jobs over many images: the local engine, the Ray Data engine, ``--resume`` and ``summary.parquet``.

Both engines run the same function on each batch of inputs (``run_batch``): skip an input whose outputs are
complete (when resuming), else read, prepare, evaluate and write it with ``outputs.process_images``. So a job
gives the same files whichever engine runs it. What differs is only who calls ``run_batch``:

* ``local``: this process, batch after batch, on its own device;
* ``ray``: a Ray Data pipeline — the inputs (with their output names, computed here over all inputs) become a
  dataset, and ``map_batches`` runs ``run_batch`` in a pool of actors, each loading the converted network
  once (shipped as ``.pt2`` bytes through the object store, never re-converted per image).

Both write ``OUTDIR/summary.parquet`` (``summary_schema``): a single file from the local engine, a folder of
Parquet files from Ray Data's writer; ``pyarrow.parquet.read_table`` reads either as one table. Rows come in
completion order: sort by ``index`` for input order.

An input is *complete* (``completed_row``) when every file it would get exists under its final name and its
``scores.npz`` loads with the model's labels. Outputs are renamed into place only once all of them are
written, so a leftover temp file (``.<stem>.XXXX.tmp<suffix>``) never counts; a resumed job redoes every input that
is not complete and gives the complete ones an ``ok`` row with ``skipped`` set, filled from the npz.
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

import numpy as np

from fcnify.atomic import temp_beside
from fcnify.errors import FcnifyError, InputError, OutputError
from fcnify.outputs import (
    ClassPeak,
    HeatmapOptions,
    SummaryRow,
    expected_outputs,
    output_stems,
    process_images,
    resolve_classes,
    start_run,
    top_peaks,
)

__all__ = [
    "ENGINES", "JobResult", "RayOptions", "SUMMARY_NAME", "completed_row", "read_any", "read_summary",
    "run_batch", "run_job", "summary_schema", "write_summary",
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


@dataclass(frozen=True)
class _ModelMeta:
    """What ``process_images`` needs from a ``LoadedModel`` (small and picklable, for the workers)."""

    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]


# ---------------------------------------------------------------------------------------------- reading


def _fetch(uri: str) -> bytes:
    """The bytes of a file any pyarrow filesystem reads (``s3://``, ``gs://``, ``hdfs://``, ``file://``…)."""
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
        info = fs.get_file_info(inner)
        if info.type == pyarrow.fs.FileType.NotFound:
            raise InputError(f"no such image: {uri}", hint="check the URI")
        if info.type == pyarrow.fs.FileType.Directory:
            raise InputError(f"{uri} is a folder, not an image", hint="list its images in a --manifest")
        with fs.open_input_file(inner) as f:
            return f.read()
    except InputError:
        raise
    except Exception as exc:  # pyarrow raises OSError, ArrowInvalid (ValueError), ArrowNotImplementedError…
        detail = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(f"cannot read {uri}: {type(exc).__name__}: {detail}",
                         hint="check the URI and the credentials pyarrow uses for its filesystem") from exc


def read_any(source: str | os.PathLike, max_pixels: int | None = None):
    """``images.read_image`` for a local path; for a URI, its bytes read with pyarrow and decoded in memory
    with the same checks (pixel limit, truncated or corrupt files, EXIF orientation). Nothing is written."""
    from fcnify import images

    source = str(source)
    if "://" not in source:
        return images.read_image(source, max_pixels)
    return images.read_image_bytes(_fetch(source), source, max_pixels)


def _source(path: str) -> str:
    """Where a worker reads an input: URIs as given, local paths made absolute (a Ray worker's working
    directory is not the driver's)."""
    return path if "://" in path else os.path.abspath(path)


# ----------------------------------------------------------------------------------------------- resume


def _resized(size: tuple[int, int], scale: float) -> tuple[int, int]:
    if scale == 1.0:
        return size
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def completed_row(path: str, stem: str, options: HeatmapOptions, classes: Sequence[int], labels: Sequence[str],
                  window: Sequence[int]) -> SummaryRow | None:
    """The summary row of an input whose outputs are complete, or None when it must be (re)done.

    Complete: every file ``write_outputs`` gives it exists under its final name (a temp file left by an
    interrupted write has another name) and its ``scores.npz`` loads, for a model with these labels. The
    row's sizes and top classes are read back from the npz, exactly as the run that wrote it computed them.
    """
    import torch

    from fcnify.dense import ScoreMap

    targets = expected_outputs(stem, options.outdir, classes, labels)
    if not all(target.is_file() for target in targets.values()):
        return None
    try:
        with np.load(targets["scores"], allow_pickle=False) as data:
            logits = torch.from_numpy(np.asarray(data["logits"], dtype=np.float32))
            saved = tuple(str(v) for v in data["labels"])
            geometry = {name: tuple(v.item() for v in data[name]) for name in ("stride", "offset", "window")}
            image_size = tuple(int(v) for v in data["image_size"])
    except Exception as exc:  # a damaged or foreign npz: redo the image
        _logger.info("%s: redoing, %s does not load (%s)", path, targets["scores"], exc)
        return None
    if saved != tuple(str(v) for v in labels) or logits.dim() != 3 or logits.shape[0] != len(saved):
        _logger.info("%s: redoing, %s is from another model", path, targets["scores"])
        return None
    resized = _resized(image_size, float(options.scale))
    padded = resized[0] < int(window[0]) or resized[1] < int(window[1])
    smap = ScoreMap(logits, saved, image_size=image_size, padded=padded, **geometry)
    return SummaryRow(path=str(path), status="ok", image_size=image_size, map_size=smap.map_size, padded=padded,
                      top=top_peaks(smap, options.top_k), outputs=tuple(str(t) for t in targets.values()),
                      skipped=True)


# -------------------------------------------------------------------------------------------- one batch


def run_batch(paths: Sequence[str], sources: Sequence[str], stems: Sequence[str], fcn, geometry, meta,
              options: HeatmapOptions, classes: Sequence[int], device, resume: bool = False,
              progress: Callable[[str], None] | None = None) -> list[SummaryRow]:
    """The work on one batch, the same in every engine: one row per input, in order.

    Args:
        paths: the inputs as the user gave them (the rows' ``path``).
        sources: where to read them (``_source``: absolute paths or URIs).
        stems: their output names, computed over the whole job.
        fcn, geometry, meta: the network, its geometry, and ``in_chans``/``mean``/``std``/``labels``.
        options: the heatmap options (``outdir`` absolute for Ray workers).
        classes, device: from ``outputs.start_run``.
        resume: skip inputs whose outputs are complete (``completed_row``).
    """
    rows: list[SummaryRow | None] = [None] * len(paths)
    todo = list(range(len(paths)))
    if resume:
        window = tuple(int(v) for v in geometry.window)
        labels = tuple(str(v) for v in meta.labels)
        for i in list(todo):
            row = completed_row(paths[i], stems[i], options, classes, labels, window)
            if row is not None:
                rows[i] = row
                todo.remove(i)
                if progress is not None:
                    progress(paths[i])
    done = process_images([sources[i] for i in todo], [stems[i] for i in todo], fcn, geometry, meta, options,
                          classes, device, read=read_any)
    for i, row in zip(todo, done, strict=True):
        row.path = str(paths[i])  # the input as given, whichever absolute path the worker read
        rows[i] = row
        if progress is not None:
            progress(paths[i])
    return rows  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- summary


def summary_schema():
    """The Arrow schema of ``summary.parquet`` (both engines): one row per input.

    ``top`` is the top-k classes by peak probability, best first: class index, label, peak probability and
    the peak cell's window centre (y, x) in the original image's pixels. ``outputs`` are relative to OUTDIR.
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
    ])


def _relative(path: str, outdir: Path) -> str:
    try:
        return Path(path).relative_to(outdir).as_posix()
    except ValueError:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(outdir)).as_posix()


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
        rows.append(SummaryRow(path=r["path"], status=r["status"], error=r["error"], image_size=size,
                               map_size=cells, padded=bool(r["padded"]), top=top,
                               outputs=tuple(str(Path(outdir) / p) for p in r["outputs"] or []),
                               skipped=bool(r["skipped"])))
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


def _have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------- jobs


def run_job(paths: Sequence[str], fcn, geometry, loaded, options: HeatmapOptions, engine: str = "local",
            ray_options: RayOptions | None = None, resume: bool = False,
            progress: Callable[[str], None] | None = None, model_file: str | os.PathLike | None = None,
            trust_model: bool = False) -> JobResult:
    """Heatmaps for every input with the chosen engine, and ``OUTDIR/summary.parquet``.

    Args:
        paths: inputs (local paths or, on Ray and locally, URIs pyarrow reads).
        fcn, geometry: the converted network and its geometry.
        loaded: the ``LoadedModel`` (for ``in_chans``, ``mean``, ``std``, ``labels``, ``source``).
        options: the heatmap options.
        engine: ``local`` or ``ray``.
        ray_options: the Ray engine's options.
        resume: skip inputs whose outputs are complete.
        progress: called with each input once it is done (local engine; Ray shows its own progress bars).
        model_file: the ``.pt2``/``.onnx`` the network came from, shipped to Ray workers as it is.
        trust_model: the workers may load a ``.pt2`` holding pickles or compiled code (as on the driver).

    Raises:
        InputError: bad options, an unknown engine; FcnifyError: Ray missing or failing as a whole.
    """
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}", hint="use --engine local or --engine ray")
    options.validate()
    paths = [str(p) for p in paths]
    stems = output_stems(paths)  # once, over all inputs: every engine and worker uses the same names
    meta = _ModelMeta(int(loaded.in_chans), tuple(loaded.mean), tuple(loaded.std),
                      tuple(str(v) for v in loaded.labels))
    if engine == "local":
        return _run_local(paths, stems, fcn, geometry, meta, options, resume, progress)
    ray_options = ray_options or RayOptions()
    ray_options.validate()
    return _run_ray(paths, stems, fcn, geometry, loaded, meta, options, ray_options, resume, model_file,
                    trust_model)


def _run_local(paths, stems, fcn, geometry, meta, options, resume, progress) -> JobResult:
    classes, device = start_run(fcn, meta, options)
    start = time.perf_counter()
    rows: list[SummaryRow] = []
    for first in range(0, len(paths), options.batch_size):
        chunk = slice(first, first + options.batch_size)
        sources = [_source(p) for p in paths[chunk]]
        rows += run_batch(paths[chunk], sources, stems[chunk], fcn, geometry, meta, options, classes, device,
                          resume=resume, progress=progress)
    seconds = time.perf_counter() - start
    summary = None
    if _have_pyarrow():
        summary = write_summary(rows_to_table(rows, range(len(rows)), stems, options.outdir), options.outdir)
    else:
        _logger.warning("pyarrow is not installed: no %s written (pip install pyarrow)", SUMMARY_NAME)
    processed = sum(1 for row in rows if not row.skipped)
    return JobResult(rows, "local", seconds, processed, summary)


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
    kwargs: dict = {"log_to_driver": True, "configure_logging": False}
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
                                 tuple(str(v) for v in loaded.labels), fcn.geometry, loaded.source)
        target = save_pt2(fcn, metadata, workdir / "model.pt2")
        return {"kind": "file", "suffix": ".pt2", "ref": ray.put(target.read_bytes())}
    except (ExportError, AttributeError) as exc:
        _logger.warning("shipping the network pickled: it cannot be exported to .pt2 (%s)", exc)
        return {"kind": "module", "ref": ray.put(fcn)}


class _Predictor:
    """A Ray Data actor: loads the network once, then runs ``run_batch`` on each batch of inputs."""

    def __init__(self, model: dict, geometry, meta: _ModelMeta, options: HeatmapOptions, resume: bool,
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
            self.fcn = loaded.module
            self.geometry = loaded.geometry or geometry
        else:
            self.fcn, self.geometry = data, geometry
        self.meta, self.options, self.resume = meta, options, resume
        self.classes, self.device = start_run(self.fcn, meta, options)

    def __call__(self, batch):
        paths = [str(v) for v in batch.column("path").to_pylist()]
        rows = run_batch(paths, batch.column("source").to_pylist(), batch.column("stem").to_pylist(), self.fcn,
                         self.geometry, self.meta, self.options, self.classes, self.device, resume=self.resume)
        return rows_to_table(rows, batch.column("index").to_pylist(), batch.column("stem").to_pylist(),
                             self.options.outdir)


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


def _run_ray(paths, stems, fcn, geometry, loaded, meta, options, ray_options: RayOptions, resume, model_file,
             trust_model) -> JobResult:
    import torch

    from fcnify.dense import check_precision

    # What would fail in every actor fails here, once: an actor sees only the GPUs Ray gives it.
    if ray_options.gpus_per_worker == 0 and str(options.device).startswith("cuda"):
        raise InputError(f"--device {options.device} with --engine ray needs GPUs for the workers",
                         hint="pass --gpus-per-worker 1 (or a fraction), or --device cpu")
    if ray_options.gpus_per_worker == 0 and options.precision == "fp16":
        check_precision("fp16", torch.device("cpu"))
    resolve_classes(options.classes, meta.labels)  # an unknown class: fail before starting Ray
    outdir_given = Path(options.outdir)
    outdir = Path(os.path.abspath(outdir_given))
    outdir.mkdir(parents=True, exist_ok=True)
    worker_options = replace(options, outdir=outdir)
    need_cpus = max(1, math.ceil(ray_options.workers * ray_options.cpus_per_worker))
    with ray_session(ray_options.address, num_cpus=max(need_cpus, os.cpu_count() or 1)) as ray, \
            tempfile.TemporaryDirectory(prefix="fcnify-ray-") as tmp:
        import ray.data

        model = _ship_model(ray, fcn, loaded, model_file, Path(tmp))
        items = [{"index": i, "path": p, "source": _source(p), "stem": s}
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
                fn_constructor_kwargs={"model": model, "geometry": geometry, "meta": meta,
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
