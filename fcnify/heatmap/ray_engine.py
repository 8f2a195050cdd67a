"""The Ray engine: a Ray Data pipeline over the inputs, or over the tiles of the slides.

The work becomes a dataset and ``map_batches`` runs it in one pool of actors, each loading the converted
network once (shipped through the object store: the user's ``.pt2``/``.onnx`` bytes, or the converted module;
never re-converted per image). Its rows are
whole images (the actor runs the local pipeline on them) or, for slides shared out tile by tile, tile
indices: the driver plans each slide and opens its zarr store (``ImageRun``), only tile indices travel, each
actor reads its tiles' regions from the slide itself and writes their chunks into the store (one chunk per
tile, so no two actors share one), and the driver records each tile reported back in the store's resume log
and finishes the slide (previews, viewer files) when its last tile is in. A killed actor is restarted by Ray
and its batch retried; a killed driver leaves a store that ``--resume`` goes on with. Ray itself is optional
(``pip install 'fcnify[ray]'``): it is imported only when a job asks for it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import pickle
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fcnify.device import check_precision
from fcnify.errors import EngineError, ExportError, FcnifyError, InputError, InternalError, first_line
from fcnify.export import ModelMetadata, save_pt2
from fcnify.heatmap.geo import open_source
from fcnify.heatmap.job import ImageJob, ModelInfo, resolve_classes
from fcnify.heatmap.local import readable_path, run_paths
from fcnify.heatmap.options import HeatmapOptions
from fcnify.heatmap.pipeline import ImageRun, TileShard, compute_shard
from fcnify.heatmap.sources import open_view
from fcnify.heatmap.summary import (
    SUMMARY_NAME,
    JobResult,
    SummaryRow,
    clear_summary,
    rows_to_table,
    table_to_rows,
)
from fcnify.models import load_model
from fcnify.optional import require

__all__ = ["RayOptions", "SPLITS", "ray_session", "require_ray", "run_ray"]

_logger = logging.getLogger(__name__)

#: ``--split``: how the Ray engine shares work out (see ``_split``).
SPLITS = ("auto", "images", "tiles")
#: Images a worker keeps open for the tiles it is sent (each holds a file handle and its tile cache).
_OPEN_IMAGES = 4


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
        split: ``images`` (each actor computes whole images), ``tiles`` (the tiles of every slide are shared
            out over the actors, which read their regions and write their chunks themselves) or ``auto``
            (tiles when there are fewer than two images per actor).
    """

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_restarts: int | None = None
    max_task_retries: int | None = None
    split: str = "auto"

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise InputError(f"--split {self.split!r} is not one of {', '.join(SPLITS)}", hint="e.g. --split tiles")
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
    """Put the network in the object store once, for every actor: the user's ``.pt2``/``.onnx`` bytes as they
    are; else the converted network itself (Ray's pickling, between this driver and its own actors), which
    keeps what a ``.pt2`` round trip loses: the module the local engine runs, exportable to onnxruntime by
    ``--runtime auto`` as it is there. A network Ray cannot pickle travels as a ``.pt2``."""
    if model_file is not None and Path(model_file).suffix in (".pt2", ".onnx"):
        path = Path(model_file)
        return {"kind": "file", "suffix": path.suffix, "ref": ray.put(path.read_bytes())}
    if getattr(loaded, "converted", False) and isinstance(loaded.extra, dict) and loaded.extra.get("path"):
        path = Path(loaded.extra["path"])  # an .onnx loaded by load_onnx_model
        return {"kind": "file", "suffix": path.suffix, "ref": ray.put(path.read_bytes())}
    try:
        return {"kind": "module", "ref": ray.put(fcn)}
    except Exception as exc:  # Ray's pickling fails in many ways (a lambda, a lock, a C extension object)
        _logger.warning("shipping the network as .pt2: Ray cannot pickle it (%s)", first_line(exc))
    try:
        target = save_pt2(fcn, ModelMetadata.of(loaded, fcn), workdir / "model.pt2")
    except (ExportError, AttributeError) as exc:
        raise EngineError(f"cannot send the network to the Ray workers: {first_line(exc)}",
                          hint="use --engine local") from exc
    return {"kind": "file", "suffix": ".pt2", "ref": ray.put(target.read_bytes())}


class _Worker:
    """A Ray Data actor: loads the network once, then runs its batches' rows: whole images (``run_image``, as
    the local engine does) or tiles of an image the driver has shared out (``compute_shard``: it reads the
    tiles' regions from the image itself and writes their chunks into the image's store)."""

    def __init__(self, model: dict, geometry, info: ModelInfo, options: HeatmapOptions, resume: bool,
                 trust_model: bool, shards: dict, metadata: ModelMetadata | None = None):
        import ray  # lazy: Ray is optional (the actor runs where it is installed)

        data = ray.get(model["ref"]) if isinstance(model["ref"], ray.ObjectRef) else model["ref"]
        if model["kind"] == "file":
            # load_model takes a path: the bytes go to a private temp file, read once and removed.
            with tempfile.TemporaryDirectory(prefix="fcnify-model-") as tmp:
                path = Path(tmp) / f"model{model['suffix']}"
                path.write_bytes(data)
                loaded = load_model(str(path), trust_model=trust_model)
            fcn, geometry = loaded.module, loaded.geometry or geometry
            if model.get("output") is not None and hasattr(fcn, "select"):  # the driver's --output, not the file's
                fcn = fcn.select(model["output"])
                geometry = fcn.geometry
        else:
            fcn = data
        # With the metadata, --runtime auto may run the tiles on onnxruntime here as the local engine would
        # (0.55x PyTorch's time on the CPU); without it the actor would stay on PyTorch.
        self.job = ImageJob(fcn, geometry, info, options, metadata)
        self.resume = resume
        self.shards = ray.get(shards["ref"]) if shards.get("ref") is not None else {}
        self.views: OrderedDict[int, tuple] = OrderedDict()  # the images this actor has open, latest last

    def __call__(self, batch):
        import pyarrow as pa  # lazy: comes with Ray Data

        indices, tiles = batch.column("index").to_pylist(), batch.column("tile").to_pylist()
        paths, stems = batch.column("path").to_pylist(), batch.column("stem").to_pylist()
        out: list[tuple[int, int, bytes]] = []
        groups: dict[int, list[int]] = {}
        for index, tile, path, stem in zip(indices, tiles, paths, stems, strict=True):
            if tile < 0:
                row = run_paths([path], [stem], self.job, self.resume)[0]
                out.append((index, tile, pickle.dumps(row)))
            else:
                groups.setdefault(index, []).append(tile)
        for index, group in groups.items():
            try:
                finished, runtime = compute_shard(self.shards[index], group, self.job, self._view(index))
                out += [(index, tile, pickle.dumps(("ok", peaks, runtime))) for tile, peaks in finished]
            except FcnifyError as exc:  # the driver turns it into the image's error row
                out += [(index, tile, pickle.dumps(("error", str(exc)))) for tile in group]
        return pa.table({"index": pa.array([o[0] for o in out], pa.int64()),
                         "tile": pa.array([o[1] for o in out], pa.int64()),
                         "payload": pa.array([o[2] for o in out], pa.binary())})

    def _view(self, index: int):
        """The image of shard ``index``, opened once per actor (a few kept open: many slides share the pool)."""
        if index not in self.views:
            options = self.job.options
            source = open_source(self.shards[index].path, options.max_pixels, options.bands, options.scale_range)
            self.views[index] = (source, open_view(source, level=options.level, mpp=options.mpp, scale=options.scale))
            while len(self.views) > _OPEN_IMAGES:
                self.views.popitem(last=False)[1][0].close()
        self.views.move_to_end(index)
        return self.views[index][1]


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


def _split(ray_options: RayOptions, count: int) -> str:
    """``tiles`` or ``images``: ``auto`` shares images out tile by tile when there are too few of them to keep
    every actor busy with whole images (fewer than two per actor), and whole images otherwise."""
    if ray_options.split != "auto":
        return ray_options.split
    return "tiles" if count < 2 * int(ray_options.workers) else "images"


class _SharedImages:
    """The driver's side of images shared out tile by tile: it plans each one and opens its store
    (``ImageRun.open``/``start``), records the tiles workers report (the store's resume log), and finishes
    each image (previews, viewer files, the store renamed into place) once its last tile is in."""

    def __init__(self, job: ImageJob, resume: bool):
        self.job, self.resume = job, resume
        self.runs: dict[int, ImageRun] = {}
        self.left: dict[int, set[int]] = {}  # tiles not reported yet, per image
        self.errors: dict[int, str] = {}
        self.started: dict[int, float] = {}
        self.given: dict[int, str] = {}

    def prepare(self, index: int, path: str, stem: str) -> tuple[SummaryRow | None, list[int] | None]:
        """(the image's row, if it is done already or failed; its tiles to share out, None: send it whole)."""
        self.started[index] = time.perf_counter()
        run = ImageRun(readable_path(path), stem, self.job, self.resume)
        try:
            done = run.open()
            if done is None and run.splittable:
                run.start()
                self.runs[index], self.given[index] = run, path
                self.left[index] = {run.tiles.index(t) for t in run.todo}
                return None, sorted(self.left[index])
        except FcnifyError as exc:
            done = run.failed(str(exc), self.started[index])
        finally:
            if index not in self.runs:
                run.close()
        if done is not None:
            done.path = path
        return done, None

    def shards(self) -> dict[int, TileShard]:
        return {index: run.shard() for index, run in self.runs.items()}

    def reported(self, index: int, tile: int, payload: tuple) -> SummaryRow | None:
        """Take in a worker's report on one tile; the image's row once it was the last."""
        if tile not in self.left.get(index, ()):  # reported twice (a retried batch): the first one counts
            return None
        self.left[index].discard(tile)
        if payload[0] == "ok":
            self.runs[index].tile_finished(tile, payload[1], payload[2])
        else:
            self.errors.setdefault(index, payload[1])
        return None if self.left[index] else self.finish(index)

    def finish(self, index: int) -> SummaryRow:
        run = self.runs.pop(index)
        try:
            row = run.failed(self.errors[index], self.started[index]) if index in self.errors else run.finish()
        except FcnifyError as exc:
            row = run.failed(str(exc), self.started[index])
        finally:
            run.close()
        row.path = self.given[index]
        row.seconds = time.perf_counter() - self.started[index]
        return row

    def close(self) -> None:
        for run in self.runs.values():
            run.close()


def run_ray(paths, stems, fcn, geometry, loaded, info: ModelInfo, options, ray_options: RayOptions, resume,
             model_file, trust_model, metadata=None) -> JobResult:
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
    split = _split(ray_options, len(paths))
    need_cpus = max(1, math.ceil(ray_options.workers * ray_options.cpus_per_worker))
    rows: list[SummaryRow | None] = [None] * len(paths)
    # The driver plans shared images and writes their previews on the CPU: the workers hold the accelerators.
    shared = _SharedImages(ImageJob(fcn, geometry, info, replace(worker_options, device="cpu", precision="fp32"),
                                    metadata), resume) if split == "tiles" else None
    with ray_session(ray_options.address, num_cpus=max(need_cpus, os.cpu_count() or 1)) as ray, \
            tempfile.TemporaryDirectory(prefix="fcnify-ray-") as tmp, contextlib.ExitStack() as cleanup:
        import ray.data  # lazy: Ray is optional

        items = []
        for i, (path, stem) in enumerate(zip(paths, stems, strict=True)):
            tiles = None
            if shared is not None and "://" not in path:  # a URI is read whole, by one worker
                rows[i], tiles = shared.prepare(i, path, stem)
            if rows[i] is not None:
                continue
            for tile in tiles if tiles is not None else [-1]:
                items.append({"index": i, "tile": tile, "path": readable_path(path), "stem": stem})
        if shared is not None:
            cleanup.callback(shared.close)
            for i in [i for i, left in shared.left.items() if not left]:  # all background, or all resumed
                rows[i] = shared.finish(i)
        model = {**_ship_model(ray, fcn, loaded, model_file, Path(tmp)), "output": getattr(fcn, "selected", None)}
        shards = {"ref": ray.put(shared.shards())} if shared is not None and shared.runs else {}
        # Ray Data gathers rows into batches of batch_size before handing them out: with few rows, one batch
        # would take them all and leave the other actors idle (measured: 8 slides on 2 workers ran on one). So a
        # batch is at most a share of the rows that gives every actor two, and a block is one batch.
        batch = max(1, min(options.batch_size, math.ceil(len(items) / (2 * ray_options.workers))))
        blocks = max(1, math.ceil(len(items) / batch))
        # A dead actor is restarted and its batch retried: Ray Data's actor pools do so by default.
        retries = {name: value for name, value in (("max_restarts", ray_options.max_restarts),
                                                   ("max_task_retries", ray_options.max_task_retries))
                   if value is not None}
        start = time.perf_counter()
        try:
            if items:
                ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                    _Worker,
                    fn_constructor_kwargs={"model": model, "geometry": geometry, "info": info,
                                           "options": worker_options, "resume": resume, "trust_model": trust_model,
                                           "shards": shards, "metadata": metadata},
                    batch_size=batch, batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(size=ray_options.workers),
                    num_cpus=ray_options.cpus_per_worker, num_gpus=ray_options.gpus_per_worker or None,
                    **retries,
                )
                # Streamed: the driver records each tile as it arrives (so a killed driver can --resume) and
                # finishes an image while the actors go on with the next.
                for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for index, tile, payload in zip(block.column("index").to_pylist(),
                                                    block.column("tile").to_pylist(),
                                                    block.column("payload").to_pylist(), strict=True):
                        result = pickle.loads(payload)
                        if tile < 0:
                            result.path = paths[index]
                            rows[index] = result
                        else:
                            rows[index] = shared.reported(index, tile, result) or rows[index]
            seconds = time.perf_counter() - start
            missing = [paths[i] for i, row in enumerate(rows) if row is None]
            if missing:
                raise InternalError(f"the Ray job returned no result for {missing[0]}", hint="please report this")
            table = rows_to_table(rows, range(len(rows)), stems, outdir)
            summary_path = outdir / SUMMARY_NAME
            clear_summary(summary_path)
            # Ray Data's own writer: a folder of Parquet files (one here, all rows being few and small).
            ray.data.from_arrow(table).write_parquet(str(summary_path), min_rows_per_file=max(1, len(rows)))
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
        cluster = {"address": context.gcs_address, "split": split,
                   "nodes": sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive")),
                   "node_ips": sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})}
    _, rows = table_to_rows(table, outdir_given)
    processed = sum(1 for row in rows if not row.skipped)
    return JobResult(rows, "ray", seconds, processed, outdir_given / SUMMARY_NAME, cluster)
