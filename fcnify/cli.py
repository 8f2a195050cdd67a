"""The ``fcnify`` command line: options, Rich tables and progress, exit codes.

Core modules raise ``FcnifyError``; this module turns each into one red line on stderr (what went wrong,
and the hint) and the error's exit code — never a traceback. Exit codes: 0 ok, 1 bad input or usage,
2 command-line syntax (Typer), 3 not equivalent, 4 model cannot be converted or exported, 70 an internal
error (any exception fcnify does not mean to raise: one "please report" line, the traceback under --verbose).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fcnify import __version__
from fcnify.convert import convert as convert_model
from fcnify.errors import FcnifyError, InputError, InternalError, NotEquivalentError, OutputError, first_line
from fcnify.export import ModelMetadata, save_pt2
from fcnify.heatmap.options import HeatmapOptions, validate_options
from fcnify.heatmap.outputs import FORMAT_FILES, output_kind
from fcnify.heatmap.ray_engine import RayOptions, require_ray
from fcnify.heatmap.runners import ENGINES, run_job
from fcnify.images import centre_region, fit_to_window, prepare, read_image
from fcnify.inputs import ExpandedInputs, expand_inputs, read_manifest
from fcnify.models import apply_preprocessing, load_model, require_input_size
from fcnify.onnx_export import export_onnx
from fcnify.verify import dense_input_size, verify_converted
from fcnify.verify import verify as run_verify

__all__ = ["app", "main"]


def _flags_without_type(params: list) -> list:
    """Show a flag (``--resume``) as a flag: Typer labels every bool option ``<bool>``, as if it took a value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))


app = typer.Typer(
    name="fcnify", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=_Group,
    help="Rewrite image classifiers into fully-convolutional networks and see where they find each class.",
)
console = Console()
err_console = Console(stderr=True)


class _OwnLines(logging.Filter):
    """Lets fcnify's own log lines through, and other libraries' (tifffile, PIL, …) only under --verbose:
    a library's ERROR about a file fcnify reads anyway, or reports in one line of its own, is noise."""

    verbose = False

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.name == "fcnify" or record.name.startswith("fcnify.")


_OWN_LINES = _OwnLines()


def _print_version(value: bool) -> None:
    if value:
        print(f"fcnify {__version__}")
        raise typer.Exit()


@app.callback()
def _logging(
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Also log fcnify's decisions and Ray's INFO lines.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log errors only (no warnings).")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print fcnify's version and exit.")] = False,
):
    # Global options (before the command): how much fcnify logs, and Ray with it. Without either, the level is
    # the root logger's (WARNING from main()), so nothing sticks to the logger of a process that runs the app twice.
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.NOTSET
    if verbose and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fcnify").setLevel(level)
    _OWN_LINES.verbose = verbose


def _fail(exc: FcnifyError) -> typer.Exit:

    message = f"[bold red]error:[/] {escape(exc.message)}"
    if exc.hint:
        message += f" [dim](hint: {escape(exc.hint)})[/]"
    err_console.print(message, highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


def _crash(exc: Exception) -> typer.Exit:
    """An unexpected exception: one line asking for a report, and the traceback only under --verbose."""
    if logging.getLogger("fcnify").isEnabledFor(logging.INFO):
        err_console.print_exception(show_locals=False)
    detail = first_line(exc, 300)
    return _fail(InternalError(
        f"internal error: {type(exc).__name__}: {detail}",
        hint=f"this is a bug in fcnify {__version__}: please report it with the command you ran and the output "
             "of the same command with --verbose (which shows the traceback)"))


def _reports_errors(fn: Callable) -> Callable:
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FcnifyError as exc:
            raise _fail(exc) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # not an error fcnify means to raise: a bug, reported as one
            raise _crash(exc) from None

    return wrapper


ModelArg = Annotated[str | None, typer.Argument(
    help="digits, torchvision:NAME, timm:NAME, a state_dict/.safetensors (with --arch), a .pt2 or .onnx.")]
WeightsOpt = Annotated[str, typer.Option("--weights", help="default (pretrained), none (random), or a weights file.")]
ArchOpt = Annotated[str | None, typer.Option(
    "--arch", help="Architecture for a state_dict: torchvision:NAME, timm:NAME or package.module:factory.")]
SizeOpt = Annotated[str | None, typer.Option("--input-size", help="Training size: 224 or HxW (e.g. 224x192).")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-model", help="Allow pickled modules, TorchScript and unchecked .pt2: they can run code.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
MeanOpt = Annotated[str | None, typer.Option(
    "--mean", help="Per-channel mean of 0-1 pixels the model was trained with: 0.5 or 0.485,0.456,0.406 "
    "(--mean 0 --std 1: raw pixels). Default: the model's own, else ImageNet's (said so).")]
StdOpt = Annotated[str | None, typer.Option("--std", help="Per-channel std, as --mean (e.g. 0.229,0.224,0.225).")]
LabelsOpt = Annotated[str | None, typer.Option(
    "--labels", help="Class names: a comma list (cat,dog) or a text file with one name a line.")]
InChansOpt = Annotated[int | None, typer.Option(
    "--in-chans", min=1, help="Input channels, where they cannot be read from the model (1: grayscale).")]
OutputOpt = Annotated[str | None, typer.Option(
    "--output", help="For a model with several outputs (tuple, dict): the one to use, by index or name "
    "(default: the first).")]


@dataclass(frozen=True)
class _Preprocessing:
    """The user's --mean, --std, --labels and --in-chans (None: keep the model's)."""

    mean: str | None = None
    std: str | None = None
    labels: str | None = None
    in_chans: int | None = None
    output: str | None = None


def _load(model: str | None, weights: str, arch: str | None, input_size: str | None, trust: bool,
          preprocessing: _Preprocessing = _Preprocessing(), note: bool = True):

    loaded = load_model(model or "digits", weights=weights, arch=arch, input_size=input_size, trust_model=trust)
    loaded = apply_preprocessing(loaded, **vars(preprocessing))
    if note and loaded.assumed_normalisation:
        values = "mean " + ",".join(f"{v:g}" for v in loaded.mean) + ", std " + ",".join(f"{v:g}" for v in loaded.std)
        err_console.print(f"[yellow]note:[/] nothing says how {loaded.source} normalises its input; assuming "
                          f"ImageNet's {values} (set --mean/--std; --mean 0 --std 1 for raw 0-1 pixels)",
                          highlight=False, soft_wrap=True)
    return loaded


def _convert(loaded):
    """Convert the loaded classifier, with the output the user picked selected (noted when there are several)."""
    fcn = convert_model(loaded.module, require_input_size(loaded), in_chans=loaded.in_chans).select(loaded.output)
    _note_outputs(fcn, loaded.output)
    return fcn


def _note_outputs(net, picked: str | None) -> None:
    """One line naming a model's outputs and how to pick another, when it has several and none was picked."""
    note = net.outputs_note() if hasattr(net, "outputs_note") else ""
    if note and picked is None:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


def _fmt(value: float) -> str:
    return f"{value:.2e}"


def _geometry_table(geometry) -> Table:
    table = Table(title="Geometry (y, x in input pixels)", show_header=False)
    g = geometry.to_dict() if hasattr(geometry, "to_dict") else geometry
    for key in ("stride", "offset", "window", "receptive_field", "rf_centre"):
        table.add_row(key.replace("_", " "), " × ".join(str(v) for v in g[key]))
    table.add_row("dense = crops", "exact" if g["exact"] else "approximate")
    return table


def _report_tables(report) -> list[Table]:
    # Short headers (max errors, top-1 agreement): the tables fit an 80-column terminal without wrapping.
    table = Table(title="Training-size equivalence (max errors)")
    for column in ("dtype", "device", "abs err", "rel err", "top-1", "tolerance", "result"):
        table.add_column(column, no_wrap=column == "result")
    for agreement in [report.strict] + report.others:
        gate = "gate" if agreement is report.strict else "info"
        table.add_row(agreement.dtype, agreement.device, _fmt(agreement.max_abs_error),
                      _fmt(agreement.max_rel_error), f"{agreement.top1_agreement:.0%}", _fmt(agreement.tolerance),
                      ("[green]pass[/]" if agreement.passed else "[red]FAIL[/]") + f" ({gate})")
    tables = [table]
    if report.outputs:
        per_output = Table(title="Each output at the training size (max errors)")
        for column in ("output", "dtype", "abs err", "rel err", "top-1", "result"):
            per_output.add_column(column, no_wrap=column == "result")
        for a in report.outputs:
            per_output.add_row(a.output, a.dtype, _fmt(a.max_abs_error), _fmt(a.max_rel_error),
                               f"{a.top1_agreement:.0%}", "[green]pass[/]" if a.passed else "[red]FAIL[/]")
        tables.append(per_output)
    if report.dense is not None:
        d = report.dense
        which = f"output {d.output}: " if d.output else ""
        dense = Table(title=f"Dense map vs original on crops ({which}{d.input_size[0]}×{d.input_size[1]} input, "
                            f"max deviations) on {d.content}")
        for column in ("map", "cells", "abs dev", "rel dev", "top-1", "label", "cause"):
            dense.add_column(column)
        dense.add_row(f"{d.map_size[0]}×{d.map_size[1]}", str(d.cells_checked), _fmt(d.max_abs_error),
                      _fmt(d.max_rel_error), f"{d.top1_agreement:.0%}",
                      ("[green]exact[/]" if d.exact else "[yellow]approximate[/]") if d.passed else "[red]FAIL[/]",
                      "; ".join(d.causes) or "-")
        tables.append(dense)
    return tables


#: What ``convert -o`` writes, by the name's suffix.
_CONVERT_SUFFIXES = (".pt2", ".onnx")


@app.command(cls=_Command)
@_reports_errors
def convert(
    model: ModelArg = None,
    out: Annotated[Path | None, typer.Option(
        "-o", "--out", help="Output .pt2 (torch.export) or .onnx, by its suffix (default <name>.fcn.pt2).")] = None,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="Also write an ONNX model with dynamic H×W.")] = None,
    input_size: SizeOpt = None,
    weights: WeightsOpt = "default",
    arch: ArchOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    trust_model: TrustOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    labels: LabelsOpt = None,
    in_chans: InChansOpt = None,
    output: OutputOpt = None,
    as_json: JsonOpt = False,
):
    """Rewrite MODEL into a fully-convolutional network, verify it, and save it as a standalone .pt2."""

    if output is not None and output.lower().endswith(_CONVERT_SUFFIXES):
        raise InputError(f"--output {output}: --output picks one of the model's outputs (an index or a name)",
                         hint=f"write the file with -o {output}")
    if out is not None and out.suffix.lower() not in _CONVERT_SUFFIXES:
        raise InputError(f"-o {out}: fcnify writes {' or '.join(_CONVERT_SUFFIXES)} files, not "
                         f"{out.suffix or 'a name without a suffix'}",
                         hint="end the name with .pt2 (torch.export) or .onnx (ONNX with dynamic H×W)")
    loaded = _load(model, weights, arch, input_size, trust_model,
                   _Preprocessing(mean, std, labels, in_chans, output))
    if loaded.converted:
        raise InputError(f"{model} is already converted",
                         hint="use it with 'fcnify heatmap', or check it with 'fcnify verify FILE --against SOURCE'")
    out = out or Path(f"{loaded.name}.fcn.pt2")
    layout = loaded.extra.get("input_layout")
    if layout and onnx is None:  # an ONNX classifier: its conversion as ONNX too, beside the .pt2
        onnx = out.with_suffix(".onnx")
        if onnx.resolve() == Path(model).resolve():  # never the original's own name
            onnx = out.with_name(f"{out.stem}.fcn.onnx")
    for path in (out, onnx):
        if path is not None and path.exists() and not force:
            raise OutputError(f"{path} already exists", hint="pass --force to overwrite it, or choose another path")
    fcn = _convert(loaded)
    report = run_verify(loaded.original, fcn, dense_cells=0)
    if not report.passed:
        raise NotEquivalentError(
            f"the converted network differs from the original by {report.strict.max_rel_error:.2e} (relative) "
            f"at {fcn.input_size[0]}x{fcn.input_size[1]}; nothing was written",
            hint="please report this model: fcnify refuses to save a network that is not equivalent")
    metadata = ModelMetadata.of(loaded, fcn)
    as_onnx = out.suffix.lower() == ".onnx"  # -o writes the format its suffix names
    if as_onnx:
        onnx = None if onnx == out else onnx
        output_report = export_onnx(fcn, metadata, out, force=force)
    else:
        save_pt2(fcn, metadata, out, force=force)
    result = {"output": str(out), "format": "onnx" if as_onnx else "pt2", "source": loaded.source,
              "input_size": list(fcn.input_size), "preprocessing": loaded.preprocessing,
              "geometry": fcn.geometry.to_dict(), "verification": report.to_dict(),
              "outputs": [o.to_dict() for o in fcn.outputs_summary()], "selected_output": fcn.selected,
              "rewrites": [vars(r) for r in fcn.rewrites]}
    if layout:
        result["input_layout"] = {"original": layout, "converted": "NCHW"}
    onnx_files = [(out, output_report)] if as_onnx else []
    if onnx is not None:

        onnx_files.append((onnx, export_onnx(fcn, metadata, onnx, force=force)))
    if onnx_files:
        path, onnx_report = onnx_files[-1]
        result["onnx"] = {"output": str(path), **onnx_report.to_dict()}
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    table = Table(title=f"Rewritten layers of {loaded.source}")
    for column in ("node", "was", "now", "in shape", "out shape"):
        table.add_column(column)
    for r in fcn.rewrites:
        table.add_row(r.node, r.old, r.new, str(r.in_shape or ""), str(r.out_shape or ""))
    console.print(table)
    console.print(_geometry_table(fcn.geometry))
    for t in _report_tables(report):
        console.print(t)
    for path, onnx_report in onnx_files:
        checked = ", ".join("x".join(map(str, c.input_size)) for c in onnx_report.checks)
        console.print(f"[green]wrote[/] {path} (opset {onnx_report.opset}, onnx.checker full check, "
                      f"onnxruntime agrees with PyTorch at {checked})")
    if not as_onnx:
        console.print(f"[green]wrote[/] {out}  (torch.export.load('{out}').module() runs any H×W ≥ "
                      f"{fcn.input_size[0]}×{fcn.input_size[1]})")
    if layout:
        console.print(_layout_line(loaded.source, layout), highlight=False)


def _layout_line(source: str, layout: str) -> str:
    """One line on the input layout of a converted ONNX classifier (NHWC originals take NCHW once converted)."""
    if layout == "NHWC":
        return (f"input layout: {source} takes N×H×W×C images; the converted network takes N×C×H×W, as every "
                "fcnify network (input_layout NHWC recorded in the metadata)")
    return f"input layout: N×C×H×W, as {source}"


def _verification_images(paths: list[Path], loaded, fcn) -> tuple[list, list, str | None]:
    """The user's images at the training size, their centres for the dense check (at their own resolution,
    prepared as ``heatmap`` prepares them; a small image resized to cover), and what the dense check runs on,
    for the report."""
    if not paths:
        return [], [], None
    pictures = [read_image(p) for p in paths]
    training = [prepare(fit_to_window(p, fcn.input_size), loaded.in_chans, loaded.mean, loaded.std).tensor
                for p in pictures]
    # Each image's centre, at least the synthetic scene's size and up to 8 strides past the window (more cells
    # for --cells to sample, at a bounded float64 cost).
    smallest, largest = dense_input_size(fcn.geometry), dense_input_size(fcn.geometry, grow=8)
    regions = [centre_region(p, tuple(max(lo, min(side, hi)) for lo, side, hi in
                                      zip(smallest, (p.height, p.width), largest, strict=True))) for p in pictures]
    dense = [prepare(region, loaded.in_chans, loaded.mean, loaded.std).tensor for region, _ in regions]
    where = "resized to cover" if any(resized for _, resized in regions) else "at full resolution"
    content = f"image{'s' if len(paths) > 1 else ''} {', '.join(p.name for p in paths)} (centre, {where})"
    return training, dense, content


@app.command(cls=_Command)
@_reports_errors
def verify(
    model: ModelArg = None,
    input_size: SizeOpt = None,
    weights: WeightsOpt = "default",
    arch: ArchOpt = None,
    against: Annotated[str | None, typer.Option(
        "--against", help="For a converted .pt2/.onnx: the original model spec to check it against.")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Random inputs at the training size.")] = 4,
    cells: Annotated[int, typer.Option(
        "--cells", min=0, help="Dense cells to compare with crops, per image (0: skip).")] = 8,
    device: Annotated[str | None, typer.Option("--device", help="Also report figures on this device.")] = None,
    image: Annotated[list[Path] | None, typer.Option(
        "--image", help="Also compare on this image (repeatable): resized and centre-cropped to the training size, "
        "and its centre at full resolution for the dense check (default: a synthetic picture-like scene).")] = None,
    trust_model: TrustOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    labels: LabelsOpt = None,
    in_chans: InChansOpt = None,
    output: OutputOpt = None,
    as_json: JsonOpt = False,
):
    """Prove a conversion: same logits at the training size (float64 gate), dense map vs crops, geometry.

    With no MODEL, verifies the embedded digits model. Exit 0 when within tolerance, 3 when not.
    """

    # Random inputs need no normalisation; --image does, so the note only matters with images.
    loaded = _load(model, weights, arch, input_size, trust_model,
                   _Preprocessing(mean, std, labels, in_chans, output), note=bool(image))
    if loaded.converted:
        _note_outputs(loaded.module, output)
        if against is None:
            raise InputError(f"{model} is already converted: there is no original to compare with",
                              hint="pass --against MODEL with the spec it was converted from")

        original = _load(against, weights, arch, input_size or "x".join(map(str, loaded.input_size)), trust_model,
                         _Preprocessing(in_chans=in_chans), note=False)
        onnx_path = model if model.endswith(".onnx") else None
        report = verify_converted(original.original, loaded.module, loaded.input_size, loaded.in_chans,
                                  loaded.geometry, samples, onnx_path=onnx_path, convertible=original.module)
        _print_report(report, loaded.geometry, as_json)
        return
    fcn = _convert(loaded)
    real, dense_images, content = _verification_images(image or [], loaded, fcn)
    report = run_verify(loaded.original, fcn, samples=samples, images=real, device=device, dense_cells=cells,
                        dense_images=dense_images, dense_content=content, mean=loaded.mean, std=loaded.std)
    _print_report(report, fcn.geometry, as_json)


def _print_report(report, geometry, as_json: bool) -> None:
    """Print a verification (tables or JSON) and exit 3 when it failed."""
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        for t in _report_tables(report):
            console.print(t)
        for a in report.runtime:
            console.print(f"onnxruntime vs PyTorch at {'x'.join(map(str, a.input_size))}: "
                          f"max rel error {a.max_rel_error:.2e} ({'pass' if a.passed else 'FAIL'})")
        console.print(_geometry_table(geometry))
        console.print("[green]equivalent[/]" if report.passed else "[red]NOT equivalent[/]")
    if not report.passed:
        raise typer.Exit(NotEquivalentError.exit_code)


def _heatmap_table(rows) -> Table:
    table = Table(title="Dense class maps")
    for column in ("image", "size", "map", "tiles (bg)", "masked cells (px saved)",
                   "top classes: peak @ y, x = window centre (corner + window/2), level-0 px"):
        table.add_column(column)
    for row in rows:
        if row.status != "ok":
            table.add_row(row.path, "-", "-", "-", "-", f"[red]{row.error}[/]")
            continue
        top = ", ".join(f"{p.label} {p.score:.2f} @ {p.y:.0f},{p.x:.0f}" for p in row.top)
        size = f"{row.image_size[0]}×{row.image_size[1]}" + (" (padded)" if row.padded else "")
        tiles = "done earlier" if row.skipped else f"{row.tiles} ({row.tiles_background})"
        masked = "-" if row.foreground in (None, "all") else \
            f"{row.cells_masked} = {row.masked_fraction or 0:.0%} ({row.pixels_saved or 0:.0%})"
        table.add_row(row.path, size, f"{row.map_size[0]}×{row.map_size[1]}", tiles, masked, top)
    return table


class _JobProgress:
    """Progress of a job's images, called after each tile (``TileProgress``) and each image (``SummaryRow``).

    In a terminal: one overall bar (images done of all, ETA) and below it the current image's tiles.
    Otherwise (a log, a pipe, a batch system): a line per image, and for an image of many tiles one every
    tenth of them, so that a long job is never silent.
    """

    def __init__(self, total: int, progress: Progress | None, quiet: bool = False):
        self.total, self.progress, self.quiet = total, progress, quiet
        self.done = self.failed = 0
        self.reported: set[int] = set()  # the failed rows already printed
        self.started = time.perf_counter()
        self.current: str | None = None
        self.tile_task = None
        self.next_line = 0
        if progress is not None:
            self.overall = progress.add_task("images", total=total)

    def tiles(self, state) -> None:
        text = f"{Path(state.path).name}: {state.computed}/{state.todo} tiles computed, {state.background} background"
        if state.resumed:
            text += f", {state.resumed} done earlier"
        if self.progress is not None:
            if self.tile_task is None:
                self.tile_task = self.progress.add_task(text, total=max(1, state.todo))
            if state.path != self.current:
                self.current = state.path
                self.progress.reset(self.tile_task, total=max(1, state.todo), description=text)
            self.progress.update(self.tile_task, completed=state.computed, description=text)
            return
        if state.path != self.current:
            self.current, self.next_line = state.path, 0
        step = max(1, state.total // 10)
        if state.total >= _TILES_PER_LINE and state.finished >= self.next_line and not self.quiet:
            self.next_line = state.finished + step
            err_console.print(f"[{self.done + 1}/{self.total}] {text} ({state.finished}/{state.total} tiles)",
                              highlight=False, soft_wrap=True)

    def image(self, row) -> None:
        self.done += 1
        self.failed += row.status != "ok"
        if self.progress is not None:
            failed = f", {self.failed} failed" if self.failed else ""
            self.progress.update(self.overall, completed=self.done, description=f"images{failed}")
            return
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.total - self.done)
        eta = f", about {left:.0f} s left" if self.done < self.total else ""
        if row.status != "ok":  # the image's one line: its error, not repeated at the end (``reported``)
            self.reported.add(id(row))
            err_console.print(f"[{self.done}/{self.total}] [bold red]error:[/] {escape(_failure(row))}{eta}",
                              highlight=False, soft_wrap=True)
            return
        state = "done earlier" if row.skipped else "ok"
        err_console.print(f"[{self.done}/{self.total}] {Path(row.path).name}: {state} ({row.seconds:.1f} s){eta}",
                          highlight=False, soft_wrap=True)


#: Without a terminal, an image of at least this many tiles gets a progress line every tenth of them.
_TILES_PER_LINE = 50
#: A job of more images than this gets a summary and summary.parquet instead of a table.
_TABLE_MAX_ROWS = 20
#: What users type after a flag, as if it took a value (``--resume true``).
_FLAG_VALUES = frozenset({"true", "false", "yes", "no", "on", "off"})


def _failure(row) -> str:
    """A failed image's error, naming the file (most errors name it already)."""
    return (row.error or "") if row.path in (row.error or "") else f"{row.path}: {row.error}"


def _written(rows, outdir: Path, summary) -> str:
    """The files a job wrote, by kind: ``2 .heatmap.png, 2 .scores.npz, summary.parquet``."""
    kinds: dict[str, int] = {}
    for row in rows:
        for output in row.outputs if row.status == "ok" else ():
            kind = output_kind(Path(output).name) or Path(output).suffix
            kinds[kind] = kinds.get(kind, 0) + 1
    names = [f"{count} {kind}" for kind, count in kinds.items()] + ([Path(summary).name] if summary else [])
    return f"outputs in {outdir}/: {', '.join(names)}" if names else "nothing was written"


@app.command(cls=_Command)
@_reports_errors
def heatmap(
    images: Annotated[list[str] | None, typer.Argument(
        help="Images or slides (PNG, JPEG, TIFF, SVS, OME-TIFF, …), folders (recursive) or glob patterns.")] = None,
    model: Annotated[str, typer.Option(
        "--model", "-m", help="Model spec (as for convert) or a .pt2/.onnx.")] = "digits",
    outdir: Annotated[Path, typer.Option("-o", "--outdir", help="Output folder.")] = Path("fcnify-out"),
    manifest: Annotated[Path | None, typer.Option(
        "--manifest", help="A .txt, .csv or .parquet list of images.")] = None,
    classes: Annotated[list[str] | None, typer.Option(
        "--class", help="Class name or index to draw (repeatable).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes in <stem>.classes.png.")] = 4,
    cmap: Annotated[str, typer.Option("--cmap", help="A matplotlib colormap.")] = "inferno",
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap opacity.")] = 0.5,
    vmin: Annotated[float | None, typer.Option(
        "--vmin", help="Probability at the colormap's low end (default 0), e.g. 0.02.")] = None,
    vmax: Annotated[float | None, typer.Option(
        "--vmax", help="Probability at the colormap's high end (default 1), e.g. 0.3 for a weak model.")] = None,
    normalize: Annotated[bool, typer.Option(
        "--normalize", help="Colour each map from its own lowest to highest probability.")] = False,
    level: Annotated[int | None, typer.Option(
        "--level", min=0, help="Pyramid level to compute at (0: full resolution).")] = None,
    mpp: Annotated[float | None, typer.Option(
        "--mpp", help="Compute at this many µm per pixel (nearest finer level, resampled).")] = None,
    scale: Annotated[float, typer.Option(
        "--scale", min=0.01, help="Resize ordinary images by this factor first.")] = 1.0,
    foreground: Annotated[str, typer.Option(
        "--foreground", help="auto: skip a flat white/black background (NaN there); all: compute every cell; "
                          "default: auto for slides and TIFFs, all for ordinary pictures (PNG, JPEG, …).")] = "default",
    scores: Annotated[str, typer.Option(
        "--scores", help="Score file: auto (zarr for slides and big maps, else npz), npz or zarr.")] = "auto",
    scores_dtype: Annotated[str, typer.Option("--scores-dtype", help="float32 or float16 (zarr).")] = "float32",
    preview_size: Annotated[int, typer.Option("--preview-size", min=16, help="Longest side of the previews.")] = 4096,
    formats: Annotated[str, typer.Option(
        "--formats", help="Comma list of " + "; ".join(f"{kind} ({files})" for kind, files in FORMAT_FILES.items())
        + ".")
    ] = "png,scores",
    min_score: Annotated[float | None, typer.Option(
        "--min-score", help="GeoJSON: only cells whose top class has at least this probability.")] = None,
    scores_levels: Annotated[bool, typer.Option(
        "--scores-levels", help="Add 2x downsampled levels to a .scores.zarr (OME-NGFF multiscales).")] = False,
    bands: Annotated[str | None, typer.Option(
        "--bands", help="Bands of a multi-band scene (GeoTIFF) the model sees, 1-based as in GDAL: e.g. 4,3,2.")
    ] = None,
    scale_range: Annotated[str | None, typer.Option(
        "--scale-range", help="MIN,MAX band values that become 0 and 1 (non-uint8 scenes; default: each band's "
                              "2-98 percentiles over a thumbnail).")] = None,
    geojson_crs: Annotated[str, typer.Option(
        "--geojson-crs", help="GeoJSON of scenes with a CRS: wgs84 (longitude, latitude; RFC 7946) or source.")
    ] = "wgs84",
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", min=0,
                                                   help="Refuse larger ordinary images (0: no limit).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="fp32, fp16 (GPU) or bf16.")] = "fp32",
    runtime: Annotated[str, typer.Option(
        "--runtime", help="auto, torch or onnxruntime (auto: onnxruntime for big CPU jobs).")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Same-size tiles per batch.")] = 8,
    tile: Annotated[str | None, typer.Option(
        "--tile", help="Tile size in px (768 or 768x1024) or 'auto' (default: from --max-memory).")] = None,
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", help="Memory for a tile's working set, e.g. 2GB (default 640MB).")] = None,
    output_stride: Annotated[int | None, typer.Option(
        "--output-stride", min=1, help="Finer map: a divisor of the network's stride (dilation rewrite).")] = None,
    scales: Annotated[str | None, typer.Option(
        "--scales", help="Image pyramid, e.g. 0.5,1,2: one map per scale, combined on the grid of scale 1.")] = None,
    combine: Annotated[str, typer.Option("--combine", help="How --scales are combined: mean or max.")] = "mean",
    engine: Annotated[str, typer.Option("--engine", help="local (this process) or ray (a Ray Data job).")] = "local",
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Ray cluster to run on (else RAY_ADDRESS, else a local Ray on 127.0.0.1).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray actors, each with one copy of the model.")] = 1,
    split: Annotated[str, typer.Option(
        "--split", help="Ray: share out whole images, the tiles of each slide, or auto (tiles when there are "
                        "fewer than two images per worker).")] = "auto",
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", min=0.0, help="GPUs per Ray actor.")] = 0.0,
    cpus_per_worker: Annotated[float, typer.Option("--cpus-per-worker", min=0.01, help="CPUs per Ray actor.")] = 1.0,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Skip images whose outputs are complete; go on with partly computed slides.")] = False,
    input_size: SizeOpt = None,
    weights: WeightsOpt = "default",
    arch: ArchOpt = None,
    trust_model: TrustOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    labels: LabelsOpt = None,
    in_chans: InChansOpt = None,
    output: OutputOpt = None,
    as_json: JsonOpt = False,
):
    """Compute dense class score maps and heatmaps for images and slides, tile by tile in bounded memory."""
    arguments = dict(locals())  # the parameters, by name: those of HeatmapOptions become its fields
    items = list(images or [])
    for item in items:
        if item.lower() in _FLAG_VALUES and not Path(item).exists():
            raise InputError(f"{item!r} is not an image: flags such as --resume or --normalize take no value",
                             hint=f"write the flag alone to switch it on (drop {item!r})")
    expanded = expand_inputs(items, outdir) if items else ExpandedInputs([])
    paths = expanded.paths
    if manifest is not None:
        paths += read_manifest(manifest)
    if expanded.skipped:
        err_console.print(f"[yellow]note:[/] skipped {expanded.skipped} files that are fcnify's own outputs "
                          "(<stem>.heatmap.png, …, or in an output folder)", highlight=False, soft_wrap=True)
    if not paths:
        raise InputError("no images given", hint="name image files or folders, or pass --manifest FILE")
    options = validate_options(HeatmapOptions(**{f.name: arguments[f.name] for f in fields(HeatmapOptions)
                                                 if f.name in arguments}))
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}", hint="use --engine local or --engine ray")
    ray_options = RayOptions(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                             cpus_per_worker=cpus_per_worker, split=split)
    ray_options.validate()
    if engine == "ray":

        require_ray()  # before loading and converting the model
    loaded = _load(model, weights, arch, input_size, trust_model,
                   _Preprocessing(mean, std, labels, in_chans, output))
    metadata = None
    if loaded.converted:
        _note_outputs(loaded.module, output)  # once per job, not per image
        fcn = loaded.module
        geometry = fcn.geometry if hasattr(fcn, "selected") else loaded.geometry
        # What an in-memory ONNX export records: --runtime onnxruntime runs a .pt2 as it runs a model spec.
        metadata = (ModelMetadata.of(loaded, fcn) if hasattr(fcn, "input_size") else
                    ModelMetadata(tuple(loaded.input_size), loaded.in_chans, tuple(loaded.mean), tuple(loaded.std),
                                  tuple(loaded.labels), geometry, loaded.source,
                                  normalisation=loaded.normalisation or ""))
    else:
        fcn = _convert(loaded)
        geometry = fcn.geometry
        metadata = ModelMetadata.of(loaded, fcn)
        loaded.module = None  # the original classifier is not needed any more: free its memory
    # A converted file travels to Ray workers as it is; a user's own torch.export archive was converted here.
    model_file = model if loaded.converted and model.endswith((".pt2", ".onnx")) and Path(model).is_file() else None
    job = {"engine": engine, "ray_options": ray_options, "resume": resume, "model_file": model_file,
           "trust_model": trust_model, "metadata": metadata}
    quiet = logging.getLogger("fcnify").getEffectiveLevel() >= logging.ERROR
    lines = None
    if engine == "ray":  # Ray Data shows its own progress bars
        # Ray prints its workers' and raylet's messages (a restarted worker, say) to stdout: they go to stderr,
        # so that stdout holds only the report (--json output stays parseable).
        with contextlib.redirect_stdout(sys.stderr):
            result = run_job(paths, fcn, geometry, loaded, options, **job)
    elif as_json or not err_console.is_terminal or not console.is_terminal:
        lines = _JobProgress(len(paths), None, quiet)
        result = run_job(paths, fcn, geometry, loaded, options, progress=lines.tiles, finished=lines.image, **job)
    else:

        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=err_console, transient=True) as progress:
            bars = _JobProgress(len(paths), progress, quiet)
            result = run_job(paths, fcn, geometry, loaded, options, progress=bars.tiles, finished=bars.image, **job)
    rows, failed, counts = result.rows, result.failed, result.totals()
    if as_json:
        print(json.dumps({"outdir": str(outdir), "rows": [row.to_dict() for row in rows], **counts,
                          "cluster": result.cluster}, indent=2, default=str))
    else:
        ok_rows = [row for row in rows if row.status == "ok"]
        if ok_rows and len(rows) <= _TABLE_MAX_ROWS:
            console.print(_heatmap_table(ok_rows))  # failures follow, one line each
        bg = (f", {counts['background_fraction']:.0%} of tiles skipped as background"
              if counts["background_fraction"] is not None else "")
        console.print(f"{counts['ok']} ok, {len(failed)} failed ({result.skipped} skipped as complete); "
                      f"{result.processed} images, {counts['megapixels']:.1f} Mpx in {result.seconds:.1f} s = "
                      f"{counts['megapixels_per_second'] or 0:.2f} Mpx/s{bg} ({engine} engine)",
                      highlight=False)
        console.print(_written(rows, outdir, result.summary), highlight=False, soft_wrap=True)
        if len(rows) > _TABLE_MAX_ROWS and result.summary:
            console.print(f"one row per image (size, map, top classes, tiles): {result.summary}", highlight=False,
                          soft_wrap=True)
    for row in failed:
        if lines is None or id(row) not in lines.reported:
            err_console.print(f"[bold red]error:[/] {escape(_failure(row))}", highlight=False, soft_wrap=True)
    if failed:
        err_console.print(f"[bold red]{len(failed)} of {len(rows)} images failed[/]")
        raise typer.Exit(1)


def main() -> None:
    """The ``fcnify`` console script: warnings of fcnify and its libraries on stderr, then the app."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_OWN_LINES)
    app(prog_name="fcnify")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
