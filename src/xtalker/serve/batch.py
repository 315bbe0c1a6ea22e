"""`xtalker batch LIST`: many videos, one model load.

LIST is a CSV file with a header row, or a JSONL file (one JSON object a line); each line is one video:
`source_image` (or `source`), `driven_audio` (or `audio`), optionally `output`, and any per-video option of the
CLI by its flag name (`pose_style`, `still`, `expression_scale`, `seed`, `enhancer`, `preprocess`, `size`,
`ref_pose`, `input_yaw` ...). Empty cells are unset. Relative paths are relative to the list's folder. Options
given on the command line apply to every line that does not set them.

A failed line is reported and skipped; the rest go on. At the end: a summary of what was done and what failed
and why (also as JSON with `--report`). Exit status: 0 when every line was made, 1 when some failed, 2 when the
list itself cannot be read.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

ALIASES = {"source": "source_image", "audio": "driven_audio", "image": "source_image"}
REQUIRED = ("source_image", "driven_audio")
# Flags of one video or of a parallel run: refused by batch, so not in its help.
PER_LINE_ONLY = {"driven_audio", "source_image", "output", "stage", "job", "workers", "shard", "shards"}
TRUE, FALSE = {"1", "true", "yes", "y", "on"}, {"0", "false", "no", "n", "off"}


class ListError(ValueError):
    """The list file cannot be read (missing, unknown format, no header, missing columns)."""


@dataclass
class Line:
    number: int  # line number in the file (CSV: counting the header as 1)
    values: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # set when the line itself is malformed

    def describe(self) -> str:
        names = [Path(str(self.values[k])).name for k in REQUIRED if self.values.get(k)]
        return f"line {self.number}" + (f" ({', '.join(names)})" if names else "")


def _kind(annotation: str) -> str:
    for kind in ("bool", "list", "Path", "int", "float"):
        if kind in annotation:
            return kind
    return "str"


def _converters() -> dict[str, str]:
    from xtalker.api import OPTIONS
    from xtalker.config import InferenceConfig

    types = {f.name: str(f.type) for f in dataclasses.fields(InferenceConfig)}
    return {name: _kind(types[name]) for name in (*OPTIONS, "source_image", "driven_audio", "output")}


def _convert(name: str, value: Any, kind: str, folder: Path) -> Any:
    if value is None or (isinstance(value, str) and value.strip() == ""):  # unset: the command line's value holds
        return None
    text = value.strip() if isinstance(value, str) else value
    try:
        if kind == "bool":
            if isinstance(text, bool):
                return text
            if str(text).lower() not in TRUE | FALSE:
                raise ValueError
            return str(text).lower() in TRUE
        if kind == "list":
            items = text if isinstance(text, list) else str(text).replace(",", " ").split()
            return [float(v) for v in items]
        if kind == "Path":
            path = Path(str(text)).expanduser()
            return path if path.is_absolute() else folder / path
        if kind == "int":
            if isinstance(text, float) and not text.is_integer():
                raise ValueError
            return int(text)
        if kind == "float":
            return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a valid {kind}") from None
    return str(text)


def _typed(number: int, raw: dict[str, Any], converters: dict[str, str], folder: Path) -> Line:
    line = Line(number)
    try:
        for key, value in raw.items():
            name = ALIASES.get(key.strip(), key.strip()) if isinstance(key, str) else key
            if name not in converters:
                raise ValueError(f"unknown column {key!r}")
            converted = _convert(name, value, converters[name], folder)
            if converted is not None:
                line.values[name] = converted
        missing = [k for k in REQUIRED if k not in line.values]
        if missing:
            raise ValueError(f"no {' or '.join(missing)}")
    except ValueError as e:
        line.problem = str(e)
    return line


def read_list(path: Path) -> list[Line]:
    """The list's lines, typed; a malformed line carries its problem instead of failing the whole list."""
    if not path.is_file():
        raise ListError(f"list not found: {path}")
    folder, converters = path.resolve().parent, _converters()
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        lines = []
        for number, row in enumerate(text.splitlines(), 1):
            if not row.strip() or row.lstrip().startswith("#"):
                continue
            try:
                raw = json.loads(row)
            except json.JSONDecodeError as e:
                lines.append(Line(number, problem=f"not JSON ({e.msg})"))
                continue
            if not isinstance(raw, dict):
                lines.append(Line(number, problem="not a JSON object"))
                continue
            lines.append(_typed(number, raw, converters, folder))
        return lines
    if suffix not in (".csv", ".tsv"):
        raise ListError(f"{path}: a batch list is a .csv (with a header row) or .jsonl file")
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
    header = [ALIASES.get(h.strip(), h.strip()) for h in reader.fieldnames or []]
    missing = [k for k in REQUIRED if k not in header]
    if missing:
        raise ListError(f"{path}: the header row needs the columns {', '.join(REQUIRED)} (or source, audio); "
                        f"missing {', '.join(missing)}")
    lines = []
    for row in reader:
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue
        extra = row.pop(None, None)  # cells beyond the header
        line = _typed(reader.line_num, row, converters, folder)
        if extra and not line.problem:
            line.problem = f"{len(extra)} more cells than the header has columns"
        lines.append(line)
    return lines


def _default_output(result_dir: Path, index: int, values: dict[str, Any]) -> Path:
    return result_dir / f"{index:03d}_{Path(values['source_image']).stem}_{Path(values['driven_audio']).stem}.mp4"


def build_parser() -> argparse.ArgumentParser:
    from xtalker.cli import build_parser as cli_parser

    p = cli_parser()
    p.prog = "xtalker batch"
    p.description = ("Many videos with one model load: LIST is a CSV (header row) or JSONL file, one video a line "
                     "(source_image, driven_audio, output, per-video options). Flags apply to lines that do not "
                     "set them.")
    p.add_argument("list", type=Path, metavar="LIST", help="CSV or JSONL file, one video a line")
    for action in p._actions:  # per line, or not for batches: refused if given, so not offered
        if action.dest in PER_LINE_ONLY:
            action.help = argparse.SUPPRESS
    return p


def _given(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Options set on the command line (not left at their defaults), as API options."""
    from xtalker.api import OPTIONS

    return {k: v for k, v in vars(args).items() if k in OPTIONS and v != parser.get_default(k)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from xtalker import logs

    logs.configure(args.verbose)
    from xtalker.api import USER_ERRORS, XTalker
    from xtalker.atomic import write_json_atomic
    from xtalker.interrupt import TERMINATED_EXIT, Terminated, sigterm_as_interrupt

    for flag in ("driven_audio", "source_image", "output"):
        if getattr(args, flag) is not None:
            sys.stderr.write(f"error: --{flag} is per line in a batch list; remove it from the command\n")
            return 2
    if args.workers not in (None, 1) or any(getattr(args, f) is not None for f in ("stage", "job", "shard", "shards")):
        sys.stderr.write("error: xtalker batch renders one video at a time in this process; leave out --workers, "
                         "--stage, --job and --shard(s)\n")
        return 2
    try:
        lines = read_list(args.list)
    except ListError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    if not lines:
        sys.stderr.write(f"error: {args.list} lists no videos\n")
        return 2
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    with sigterm_as_interrupt():
        try:
            xt = XTalker(preset=args.preset, **_given(args, parser))
            loaded_s = time.perf_counter() - start
            with tqdm(total=len(lines), unit="video", desc="batch", disable=None) as bar:
                for index, line in enumerate(lines, 1):
                    results.append(_one(xt, line, index, args.result_dir, USER_ERRORS))
                    bar.update(1)
                    bar.set_postfix(failed=sum(r["status"] == "failed" for r in results))
        except USER_ERRORS as e:  # the shared setup (checkpoints, preset) cannot work for any line
            sys.stderr.write(f"error: {e}\n")
            return 1
        except Terminated:
            _summary(results, lines, time.perf_counter() - start, None, stopped="terminated (SIGTERM)")
            return TERMINATED_EXIT
        except KeyboardInterrupt:
            _summary(results, lines, time.perf_counter() - start, None, stopped="interrupted")
            return 130
    total = time.perf_counter() - start
    _summary(results, lines, total, loaded_s)
    if args.report is not None:
        write_json_atomic(args.report, {"list": str(args.list), "seconds": round(total, 2),
                                        "load_s": round(loaded_s, 2), "videos": results})
    return 0 if all(r["status"] == "done" for r in results) else 1


def _one(xt, line: Line, index: int, result_dir: Path, user_errors: tuple[type[Exception], ...]) -> dict[str, Any]:
    entry: dict[str, Any] = {"line": line.number, **{k: str(v) for k, v in line.values.items() if k in REQUIRED}}
    if line.problem:
        return {**entry, "status": "failed", "reason": line.problem}
    options = dict(line.values)
    source, audio = options.pop("source_image"), options.pop("driven_audio")
    output = options.pop("output", None) or _default_output(result_dir, index, line.values)
    try:
        video = xt.generate(source, audio, output, **options)
    except user_errors as e:
        reason = str(e)
    except Exception as e:  # an internal error on one line must not stop the others
        log.debug("line %d", line.number, exc_info=True)
        reason = f"internal error ({type(e).__name__}: {e}); run it alone with --verbose for the traceback"
    else:
        return {**entry, "status": "done", "output": str(video.output), "frames": video.frames,
                "seed": video.seed, "seconds": round(video.seconds, 2), "loaded": list(video.loaded)}
    log.warning("%s failed: %s", line.describe(), reason)
    return {**entry, "status": "failed", "reason": reason}


def _summary(results: list[dict[str, Any]], lines: list[Line], seconds: float, load_s: float | None,
             stopped: str | None = None) -> None:
    done = [r for r in results if r["status"] == "done"]
    failed = [r for r in results if r["status"] == "failed"]
    out = sys.stdout
    for r in done:
        out.write(f"{r['output']}\n")
    head = f"done {len(done)} of {len(lines)} videos, {len(failed)} failed, in {seconds:.1f} s"
    if load_s is not None:
        head += f" (networks loaded once: {load_s:.1f} s)"
    if stopped:
        head += f"; {stopped} after {len(results)} lines"
    sys.stderr.write(head + "\n")
    for r in failed:
        names = ", ".join(Path(r[k]).name for k in REQUIRED if k in r)
        sys.stderr.write(f"  line {r['line']}{f' ({names})' if names else ''}: {r['reason']}\n")
