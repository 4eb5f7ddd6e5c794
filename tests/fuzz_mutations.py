"""Seeded, deterministic mutations of the files hf_safe_exit reads, and the oracle that judges what a reader did.

Used by ``tests/test_fuzz_artifacts.py``. A mutation is a name and new bytes for one file:

* :func:`byte_mutations`: any file: empty, truncated at a few points, random bytes, a random block overwritten;
* :func:`json_mutations`: every top-level and second-level leaf (and the first element of a list, and the leaves
  of a list's first object) replaced by each of :data:`VALUES`, or deleted; a replacement equal to the value it
  replaces (``0`` for ``0.0``) is no mutation and is skipped;
* :func:`npz_mutations`: each array of an ``.npz`` of a wrong shape, of a wrong dtype (int, str, and an object
  array whose ``.npy`` header says object and whose data is *not* a pickle), with a NaN, or left out;
* :func:`tensor_mutations`: each tensor of a ``.safetensors`` file of a wrong shape or dtype, with a NaN, left
  out, or joined by one it does not expect.

The oracle (:func:`judge_python`, :func:`judge_cli`): a reader either *refuses* (a ``CalibrationFileError`` whose
message names the file; for the CLI exit status 2 and one line on stderr naming it, no traceback), or *accepts* with
the result of the unmutated file. Anything else is a failure: another exception, a different result, a hang
(:func:`guarded`), an unpickling (:func:`no_unpickling`).

The runner (:func:`run_mutations`) puts each :class:`Mutation` through entry points (functions of a copy of the
originals' folder) and collects a :class:`Report`; an acceptance must also be documented, with its reason.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import math
import pickle
import random
import shutil
import signal
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hf_safe_exit.errors import CalibrationFileError

__all__ = ["VALUES", "Hang", "Unpickled", "Outcome", "byte_mutations", "json_mutations", "npz_mutations",
           "read_npz", "write_npz", "tensor_mutations", "guarded", "no_unpickling", "run_cli", "judge_python",
           "judge_cli", "names_file", "canonical", "Mutation", "write_to", "file_mutations", "Report", "run_mutations",
           "documented_by"]

# what every leaf is replaced by: null, a string, out-of-range and special numbers, a bool, empty containers
VALUES = (("null", None), ("'x'", "x"), ("-1", -1), ("0", 0), ("1e30", 1e30), ("NaN", math.nan),
          ("Infinity", math.inf), ("true", True), ("[]", []), ("{}", {}))
_DELETED = object()


class Hang(BaseException):
    """A case ran past its time limit (a BaseException: the CLI's catch-all must not swallow it)."""


class Unpickled(BaseException):
    """Something unpickled while a file was read: a loss table must never be (a BaseException for the same reason)."""


# ----------------------------------------------------------------------------------------------- generic bytes
def byte_mutations(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    """Empty, truncated (1 byte, a third, half, all but the last byte), random bytes of the same length, and a
    random block of a quarter of the file overwritten in the middle; seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    n = len(data)
    out = [("empty file", b"")]
    for cut in sorted({1, n // 3, n // 2, n - 1}):
        if 0 < cut < n and data[cut:].strip():  # cutting only trailing whitespace changes nothing
            out.append((f"truncated to {cut} of {n} bytes", data[:cut]))
    out.append(("random bytes", rng.integers(0, 256, n, dtype=np.uint8).tobytes()))
    start, size = n // 2 - n // 8, max(1, n // 4)
    block = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    out.append(("a block of random bytes in the middle", data[:start] + block + data[start + size:]))
    return out


# ----------------------------------------------------------------------------------------------- JSON
def _same(a, b) -> bool:
    """Whether two JSON values are the same value (1 == 1.0, but true is not 1, and NaN is NaN)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def _leaf_paths(obj, depth: int = 2, prefix: tuple = ()) -> list[tuple]:
    """Paths of the leaves to mutate: every key of the objects down to ``depth`` levels of keys, the first element
    of every list met on the way, and the fields of a list's first object (a list of records)."""
    level = sum(not isinstance(k, int) for k in prefix)
    if isinstance(obj, dict):
        if level >= depth and not (prefix and isinstance(prefix[-1], int)):
            return []
        items = list(obj.items())
    elif isinstance(obj, list) and obj:
        items = [(0, obj[0])]
    else:
        return []
    paths = []
    for key, value in items:
        path = prefix + (key,)
        paths.append(path)
        paths.extend(_leaf_paths(value, depth, path))
    return paths


def _set(obj, path: tuple, value):
    """A deep copy of ``obj`` with the leaf at ``path`` replaced by ``value`` (or removed: ``_DELETED``)."""
    obj = json.loads(json.dumps(obj))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if value is _DELETED:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


def path_name(path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else str(k)) for i, k in enumerate(path))


def json_mutations(obj, depth: int = 2, skip=()) -> list[tuple[str, object]]:
    """``(name, mutated object)`` for every leaf path (see :func:`_leaf_paths`) × (:data:`VALUES` and deletion).

    A path whose name starts with one of ``skip`` is left alone. Names read ``"<path> = <value>"`` or
    ``"<path> deleted"``."""
    out = []
    for path in _leaf_paths(obj, depth):
        name = path_name(path)
        if any(name == s or name.startswith(s + ".") or name.startswith(s + "[") for s in skip):
            continue
        old = obj
        for key in path:
            old = old[key]
        for label, value in VALUES:
            if not _same(old, value):
                out.append((f"{name} = {label}", _set(obj, path, value)))
        out.append((f"{name} deleted", _set(obj, path, _DELETED)))
    return out


def dumps(obj) -> bytes:
    """JSON with NaN and Infinity written as their (non-standard) tokens, as Python's json writes them."""
    return json.dumps(obj, indent=1).encode()


def canonical(result) -> str:
    """A comparable text of a result (NaN compares equal to NaN, key order does not matter)."""
    return json.dumps(result, sort_keys=True, default=repr)


# ----------------------------------------------------------------------------------------------- .npz
def read_npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _object_npy(shape) -> bytes:
    """The bytes of an ``.npy`` whose header declares an object array, followed by zeros, not a pickle: a reader
    that refuses object arrays never looks at them, one that tried to unpickle would fail on them."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + b"\0" * 16


def write_npz(arrays: dict, objects: dict | None = None) -> bytes:
    """The bytes of an ``.npz`` of ``arrays`` (no pickles) plus, under the names in ``objects``, object-array
    headers of the given shapes (:func:`_object_npy`)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        members = {name: _npy(arr) for name, arr in arrays.items()}
        members.update({name: _object_npy(shape) for name, shape in (objects or {}).items()})
        for name, data in members.items():  # no dates: the same arrays give the same bytes
            zf.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), data,
                        compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _npy(arr) -> bytes:
    member = io.BytesIO()
    np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
    return member.getvalue()


def _wrong_shape(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 0:
        return np.array([arr[()], arr[()]])
    if arr.ndim == 1:
        return arr[:-1] if arr.size > 1 else np.concatenate([arr, arr])
    return arr[:, :-1]


def _with_nan(arr: np.ndarray) -> np.ndarray:
    out = arr.astype(np.float64).copy()
    out.reshape(-1)[0] = np.nan
    return out


def npz_mutations(arrays: dict[str, np.ndarray], skip=("header_json",)) -> list[tuple[str, bytes]]:
    """Each array (but those in ``skip``) of a wrong shape, as int, as str, as an object array, with a NaN, left
    out: ``(name, npz bytes)``."""
    out = []
    for name, arr in arrays.items():
        if name in skip:
            continue
        others = {k: v for k, v in arrays.items() if k != name}
        variants = {"of a wrong shape": _wrong_shape(arr), "as int64": arr.astype(np.int64),
                    "as str": arr.astype(str), "with a NaN": _with_nan(arr)}
        for label, new in variants.items():
            if new.dtype == arr.dtype and new.shape == arr.shape and np.array_equal(new, arr):
                continue  # an int array as int: no mutation
            out.append((f"array {name} {label}", write_npz({**others, name: new})))
        out.append((f"array {name} as an object array", write_npz(others, {name: arr.shape})))
        out.append((f"array {name} left out", write_npz(others)))
    return out


# ----------------------------------------------------------------------------------------------- safetensors
def tensor_mutations(tensors: dict) -> list[tuple[str, bytes]]:
    """Each tensor of a wrong shape, as float64 / float16 / int32, with a NaN, left out; and an unexpected one added:
    ``(name, safetensors bytes)``."""
    import torch
    from safetensors.torch import save

    out = []
    for name, t in tensors.items():
        others = {k: v for k, v in tensors.items() if k != name}
        variants = {"of a wrong shape": (t[..., :-1] if t.ndim and t.shape[-1] > 1 else torch.cat([t, t])).clone(),
                    "as float64": t.double(), "as float16": t.half(), "as int32": t.round().int()}
        nan = t.clone()
        nan.view(-1)[0] = float("nan")
        variants["with a NaN"] = nan
        for label, new in variants.items():
            out.append((f"tensor {name} {label}", save({**others, name: new.contiguous()})))
        out.append((f"tensor {name} left out", save(others)))
    out.append(("an unexpected tensor added", save({**tensors, "extra.weight": torch.zeros(2)})))
    return out


# ----------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def guarded(seconds: int):
    """Raise :class:`Hang` in the block after ``seconds`` (SIGALRM: main thread only)."""
    def hang(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def no_unpickling():
    """Raise :class:`Unpickled` if anything calls ``pickle.load`` / ``pickle.loads`` in the block."""
    def refuse(*args, **kwargs):
        raise Unpickled("pickle.load was called while reading the file")

    saved = pickle.load, pickle.loads
    pickle.load = pickle.loads = refuse
    try:
        yield
    finally:
        pickle.load, pickle.loads = saved


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``hf-safe-exit argv`` in process: (exit status, stdout, stderr)."""
    from hf_safe_exit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------------- the oracle
@dataclass
class Outcome:
    """What one entry point did with one mutated file: ``refused``, ``accepted`` (the original's result) or
    ``failure`` (``detail`` says what happened)."""

    kind: str
    detail: str = ""


def _kind(err: BaseException) -> str:
    """The exception's class, with its module when it is not a builtin one (``zlib.error``)."""
    cls = type(err)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"


def _first_line(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:300]


def names_file(text: str, names: tuple[str, ...]) -> bool:
    """Whether ``text`` names one of ``names``: a path's last parts (``"cnndm/risk_control.json"``, where the folder
    tells which of several such files), or its quoted base name (``'risk_control.json'``, as a message about a file
    known by its name only reads). A base name inside a fix's generic text (``<task>/risk_control.json``) is not."""
    return any(name in text or f"'{name.rsplit('/', 1)[-1]}'" in text for name in names)


def judge_python(fn, names: tuple[str, ...], baseline: str, seconds: int = 20) -> Outcome:
    """Run ``fn()`` (it returns a result made comparable by :func:`canonical`) and judge it: a
    ``CalibrationFileError`` naming one of ``names`` is a refusal, the baseline's result an acceptance."""
    try:
        with guarded(seconds):
            result = canonical(fn())
    except CalibrationFileError as err:
        if names_file(str(err), names):
            return Outcome("refused", f"{type(err).__name__}: {_first_line(err)}")
        return Outcome("failure", f"{type(err).__name__} not naming {names[0]}: {_first_line(err)}")
    except (Hang, Unpickled) as err:
        return Outcome("failure", f"{type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - any other exception is what the fuzz test looks for
        return Outcome("failure", f"{_kind(err)}: {_first_line(err)}")
    if result == baseline:
        return Outcome("accepted")
    return Outcome("failure", "accepted with a different result: " + _diff(baseline, result))


def judge_cli(fn, names: tuple[str, ...], baseline: str, seconds: int = 20) -> Outcome:
    """Run ``fn()`` (it returns ``(status, stderr, result)`` of a CLI command) and judge it: status 2 with one
    stderr line naming one of ``names`` and no traceback is a refusal, status 0 with the baseline's result an
    acceptance."""
    try:
        with guarded(seconds):
            status, err, result = fn()
            result = canonical(result)
    except (Hang, Unpickled) as exc:
        return Outcome("failure", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - the CLI must catch everything itself
        return Outcome("failure", f"{_kind(exc)} escaped the CLI: {_first_line(exc)}")
    lines = [line for line in err.splitlines() if line.strip()]
    if status == 2:
        if len(lines) == 1 and "Traceback" not in err and names_file(lines[0], names):
            return Outcome("refused", lines[0][:300])
        return Outcome("failure", f"exit 2 but stderr is not one line naming {names[0]}: {' | '.join(lines)[:300]}")
    if status != 0:
        return Outcome("failure", f"exit status {status}: {' | '.join(lines)[:300]}")
    if result == baseline:
        return Outcome("accepted")
    return Outcome("failure", "accepted with a different result: " + _diff(baseline, result))


def _diff(a: str, b: str) -> str:
    """Where two canonical results first differ, briefly."""
    try:
        x, y = json.loads(a), json.loads(b)
    except ValueError:
        x, y = a, b
    found = _first_difference(x, y, "")
    return found[:300] if found else "(texts differ)"


def _first_difference(x, y, where: str) -> str | None:
    if isinstance(x, dict) and isinstance(y, dict):
        for key in sorted(set(x) | set(y), key=str):
            if key not in x or key not in y:
                return f"{where}.{key}: {'missing' if key not in y else 'added'}"
            found = _first_difference(x[key], y[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for i, (a, b) in enumerate(zip(x, y)):
            found = _first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    if json.dumps(x) != json.dumps(y):
        if isinstance(x, str) and isinstance(y, str) and "\n" in x:
            xl, yl = x.splitlines(), y.splitlines()
            for i, (a, b) in enumerate(zip(xl, yl)):
                if a != b:
                    return f"{where or 'text'} line {i + 1}: {a[:100]!r} -> {b[:100]!r}"
            return f"{where or 'text'}: {len(xl)} -> {len(yl)} lines"
        return f"{where or 'result'}: {json.dumps(x)[:100]} -> {json.dumps(y)[:100]}"
    return None


# ----------------------------------------------------------------------------------------------- the runner
@dataclass
class Mutation:
    """One mutated artifact: ``apply(root)`` edits the files of a copy of the originals' folder; ``names``: what a
    refusal must name (one of them); ``entries``: the entry points it goes through (None: the artifact's);
    ``heavy``: through the heavy entry points too, always (whole-file mutations)."""

    name: str
    apply: object
    names: tuple
    entries: tuple | None = None
    heavy: bool = False


def write_to(relpath: str, data: bytes):
    def apply(root: Path) -> None:
        (root / relpath).write_bytes(data)
    return apply


def file_mutations(base: Path, relpath: str, names: tuple, seed: int, *, json_depth: int = 2, skip=(),
                   prefix: str = "") -> list[Mutation]:
    """Whole-file mutations of ``base/relpath`` and, for a JSON file, an unchanged re-encoding and its leaf mutations
    (:func:`json_mutations`). ``prefix`` starts each name (an artifact of several files says which one)."""
    data = (base / relpath).read_bytes()
    out = [Mutation(prefix + n, write_to(relpath, b), names, heavy=True) for n, b in byte_mutations(data, seed)]
    if relpath.endswith(".json"):
        obj = json.loads(data)
        again = json.dumps(dict(reversed(list(obj.items()))), indent=3).encode()
        out.insert(0, Mutation(prefix + "unchanged, re-encoded (re-indented, keys reversed)", write_to(relpath, again),
                               names, heavy=True))
        out += [Mutation(prefix + n, write_to(relpath, dumps(o)), names)
                for n, o in json_mutations(obj, json_depth, skip)]
    return out


class _Snapshot:
    """The files under ``root``, put back after each case (the cheap entry points run in place, on one copy)."""

    def __init__(self, root: Path):
        self.root = root
        self.files = {p: (p.read_bytes(), self._stat(p)) for p in root.rglob("*") if p.is_file()}

    @staticmethod
    def _stat(p: Path):
        st = p.stat()
        return st.st_size, st.st_mtime_ns

    def restore(self) -> None:
        for p in sorted(self.root.rglob("*"), reverse=True):
            if p.is_file() or p.is_symlink():
                if p not in self.files:
                    p.unlink()
            elif p.is_dir() and not any(p.iterdir()) and not any(f.is_relative_to(p) for f in self.files):
                p.rmdir()
        for p, (data, stat) in list(self.files.items()):
            if not p.is_file() or self._stat(p) != stat:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
                self.files[p] = (data, self._stat(p))


@dataclass
class Report:
    """The outcomes of one artifact's mutations: ``outcomes[mutation][entry]``, the failures, the time per entry."""

    artifact: str
    outcomes: dict = field(default_factory=lambda: defaultdict(dict))
    failures: list = field(default_factory=list)  # (mutation, entry, detail)
    seconds: Counter = field(default_factory=Counter)

    def counts(self) -> dict:
        """Cases (mutations) by verdict: a failure if any entry point failed, else accepted if any accepted."""
        kinds = Counter()
        for by_entry in self.outcomes.values():
            verdicts = {o.kind for o in by_entry.values()}
            kinds["failure" if "failure" in verdicts else "accepted" if "accepted" in verdicts else "refused"] += 1
        return {"cases": len(self.outcomes), "entry runs": sum(len(v) for v in self.outcomes.values()),
                "refused": kinds["refused"], "accepted identically": kinds["accepted"], "failures": kinds["failure"]}

    def summary(self) -> str:
        """The counts, then the failures grouped by entry point and kind: the leaves mutated (values left out) and an
        example."""
        lines = [f"{self.artifact}: {self.counts()}"]
        groups = defaultdict(list)
        for mutation, entry, detail in self.failures:
            groups[(entry, detail.split(":")[0][:80])].append((mutation, detail))
        for (entry, kind), items in sorted(groups.items()):
            stems = sorted({m.rsplit(" = ", 1)[0].removesuffix(" deleted") for m, _ in items})
            shown = ", ".join(stems[:12]) + (f", ... ({len(stems)} in all)" if len(stems) > 12 else "")
            mutation, detail = items[0]
            lines.append(f"  [{len(items)}x] {entry}: {kind}\n      on: {shown}\n"
                         f"      e.g. {mutation!r}: {detail[:300]}")
        lines.append("  seconds per entry point: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.most_common()))
        return "\n".join(lines)

    def dump(self, folder) -> None:
        """Every outcome as JSON in ``folder`` (for a closer look than the summary)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        rows = [{"mutation": m, "entry": e, "kind": o.kind, "detail": o.detail}
                for m, by_entry in self.outcomes.items() for e, o in by_entry.items()]
        name = "".join(c if c.isalnum() or c in "._" else "_" for c in self.artifact)
        (Path(folder) / f"{name}.json").write_text(json.dumps({"rows": rows, "failures": self.failures}, indent=1))


def _rooted(value, root: Path):
    """``value`` made comparable across copies: JSON, with the copy's path written as <root>."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr).replace(str(root), "<root>"))


def _judge(entry, root: Path, names: tuple, baseline: str) -> Outcome:
    kind, fn = entry
    if kind == "python":
        return judge_python(lambda: _rooted(fn(root), root), names, baseline)

    def cli():
        status, err, result = fn(root)
        return status, err, _rooted(result, root)
    return judge_cli(cli, names, baseline)


def _baselines(entries: dict, base: Path, names, tmp: Path, reset) -> dict:
    """Each entry point's result on an unmutated copy, checked to be the same on a second copy elsewhere."""
    results = {}
    for label in ("a", "b"):
        root = tmp / f"baseline_{label}" / "case"
        shutil.copytree(base, root)
        for name in names:
            kind, fn = entries[name]
            reset()
            value = fn(root)
            if kind == "cli":
                status, err, value = value
                assert status == 0, f"{name} on the unmutated files: {err}"
            text = canonical(_rooted(value, root))
            assert results.setdefault(name, text) == text, f"{name} gives another result on a second unmutated copy"
        shutil.rmtree(root.parent)
    return results


def run_mutations(entries: dict, base: Path, artifact: str, mutations: list[Mutation], cheap: tuple, heavy: tuple,
                  tmp: Path, *, sample: int, seed: int, documented, reset=lambda: None) -> Report:
    """Judge every mutation through the ``cheap`` entry points (in place, on one copy of ``base`` put back after each)
    and the heavy ones plus ``sample`` others (drawn with ``seed``) through the ``heavy`` ones too (each on a fresh
    copy); a mutation with its own ``entries`` goes through those (on a fresh copy).

    ``entries``: name -> ("python" | "cli", function of a copy's folder: a result, or for the CLI (status, stderr,
    result)). ``documented(artifact, mutation)``: why an acceptance is right, or None (then it is a failure).
    ``reset()`` runs before each call (the library's caches)."""
    wanted = set(cheap) | set(heavy) | {e for m in mutations for e in (m.entries or ())}
    baseline = _baselines(entries, base, sorted(wanted), tmp, reset)
    report = Report(artifact)
    work = tmp / "work" / "case"
    shutil.copytree(base, work)
    snapshot = _Snapshot(work)
    others = [m for m in mutations if not m.heavy and m.entries is None]
    chosen = {id(m) for m in random.Random(seed).sample(others, min(sample, len(others)))}

    def judge(name, root, mutation):
        reset()
        start = time.perf_counter()
        report.outcomes[mutation.name][name] = _judge(entries[name], root, mutation.names, baseline[name])
        report.seconds[name] += time.perf_counter() - start

    for number, mutation in enumerate(mutations):
        if mutation.entries is not None:
            in_place, fresh = [], list(mutation.entries)
        else:
            in_place = list(cheap)
            fresh = list(heavy) if mutation.heavy or id(mutation) in chosen else []
        if in_place:
            mutation.apply(work)
            for name in in_place:
                judge(name, work, mutation)
            snapshot.restore()
        if fresh:
            root = tmp / f"case{number}" / "case"
            shutil.copytree(base, root)
            mutation.apply(root)
            for name in fresh:
                judge(name, root, mutation)
            shutil.rmtree(root.parent)
    for mutation, by_entry in report.outcomes.items():
        report.failures += [(mutation, e, o.detail) for e, o in by_entry.items() if o.kind == "failure"]
        accepted = [e for e, o in by_entry.items() if o.kind == "accepted"]
        if accepted and len(accepted) + sum(o.kind == "refused" for o in by_entry.values()) == len(by_entry) \
                and documented(artifact, mutation) is None:
            report.failures.append((mutation, accepted[0], f"accepted (identically) without a documented reason, by "
                                    f"{len(accepted)} of {len(by_entry)} entry points"))
            report.outcomes[mutation][accepted[0]] = Outcome("failure", "undocumented acceptance")
    return report


def documented_by(table):
    """``documented(artifact, mutation)`` for a table of (artifact pattern, mutation pattern, reason)."""
    def documented(artifact: str, mutation: str) -> str | None:
        for art, pattern, reason in table:
            if fnmatch.fnmatchcase(artifact, art) and fnmatch.fnmatchcase(mutation, pattern):
                return reason
        return None
    return documented
