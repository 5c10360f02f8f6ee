"""A training run's folder (``output_dir``): checks before anything is built, the run's identity,
checkpoints written whole and read without unpickling, and the metrics file.

What a run writes there: ``config.yaml`` (the resolved config), ``run.json`` (the config and the
data fingerprint the run started with), ``metrics.jsonl``, ``checkpoints/step-NNNNNN/`` (DeepSpeed's
own files or ``trainer.safetensors`` + ``trainer.json``, plus ``model/`` and ``run.json``; written
under a temporary name, renamed when complete, then named by ``checkpoints/latest``; the last
``keep_last`` are kept) and ``final/``.

Resume (docs/resume.md): a run restarted into the same folder continues from its newest complete
checkpoint when the config and the data are the same (only the keys in ``RESUME_MAY_CHANGE`` may
differ); nothing in the folder is unpickled (every ``*.pt`` must load with
``torch.load(weights_only=True)``, DeepSpeed's few state classes allowed). Starting clean refuses
a folder that already holds a run unless told to move that run aside to
``<output_dir>.replaced-<time>``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shutil
import socket
import zipfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from mtbi_fast.behaviors_folder import BehaviorsFolder
from mtbi_fast.io import atomic_write_text, move_aside, sha256_files
from mtbi_fast.lock import LOCK_NAME

# Keys that may differ between a checkpoint and the run that resumes it (docs/resume.md): how
# long to train, how often to log, evaluate and save, how the batches are built (they are the
# same batches), how the loss is computed (the same loss) and where the run lives. The data keys
# are paths: they may move, and their contents are compared by fingerprint instead.
RESUME_MAY_CHANGE = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.save_every", "train.keep_last",
    "data.num_workers", "data.prefetch_factor", "data.skip_bad_audio", "data.skip_bad_shards",
    "data.verify_shards",
    "model.loss.backend",
    "model.loss.chunk_size", "model.loss.memory_budget", "model.loss.check_finite",
    "model.gradient_checkpointing", "model.fused_ops", "train.peak_tflops", "train.report_to",
    "packing.max_tokens", "output_dir",
    "model.llm.revision", "model.encoder.revision"})  # the commits they resolve to are compared instead
DATA_KEYS = ("data.train_manifest", "data.behaviors", "data.train_shards", "data.eval_manifest",
             "data.eval_behaviors")
# Keys added after runs began whose recorded value is not the default: a run recorded without
# data.reader read its data into memory ("auto" is resolved before the config is recorded).
IMPLIED_BEFORE = {"data.reader": "memory"}
WRITE_PROBE = ".write-test-"
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler:LossScaler",
                          "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
                          "deepspeed.runtime.zero.config:ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment:fragment_address")
# The only non-torch types DeepSpeed 0.19 pickles into its ZeRO-1/2/3 checkpoint files (seen in
# its optimizer states): two loss-scaler classes (plain attributes: scale, counters, flags), the
# ZeRO-stage enum (an int) and a dataclass of two ints. Allowing them lets the unpickler build
# these and nothing else; it never calls their methods.


# ---- before anything is built -----------------------------------------------------------------

def check_output_dir(out: Path) -> None:
    """``out`` exists (created if missing) and this process can write in it."""
    probe = out / f"{WRITE_PROBE}{socket.gethostname()}-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output_dir {out} is not a writable folder ({exc.strerror or exc})") from None


def read_deepspeed_config(path: str) -> dict:
    """The DeepSpeed JSON, checked to exist and parse (errors name the file)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {p} (the deepspeed key)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: cannot read the DeepSpeed config ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: a DeepSpeed config must be a JSON object, got {type(cfg).__name__}")
    if not isinstance(cfg.get("zero_optimization", {}), dict):
        raise ValueError(f"{p}: zero_optimization must be an object")
    return cfg


# ---- how a run starts: resume or begin ----------------------------------------------------------

def prepare_run(out: Path, cfg: dict, fingerprint: dict, resume: bool, overwrite: bool) -> str | None:
    """Decide how the run in ``out`` starts and record it (``config.yaml``, ``run.json``): the
    name of the checkpoint to resume, checked to be this run's and to hold no pickle, or None.
    Without ``resume``, a folder that holds a run is refused unless ``overwrite``, which moves
    that run aside. Refusals are user errors. For the process holding the folder's lock."""
    root = out / "checkpoints"
    ckpt = None
    contents = _contents(out)
    if contents and not is_run_folder(out) and not overwrite:
        raise ValueError(
            f"output_dir {_named(out)} is not empty and holds no run of this trainer "
            f"({_listing(contents)}): training would overwrite its files; use a new or empty "
            f"output_dir, or add --overwrite to move what it holds aside to {out.name}.replaced-<time>")
    if not resume:
        _start_clean(out, overwrite)
    else:
        for partial in root.glob(".step-*.tmp") if root.is_dir() else ():
            shutil.rmtree(partial, ignore_errors=True)  # a save cut short: never resumed
        done = complete_checkpoints(root)
        if done:
            ckpt = done[-1]
            record = ckpt / "run.json"
            if not record.is_file():
                raise ValueError(f"cannot resume from {ckpt}: it has no run.json (written by an "
                                 "older mtbi-fast, or not a checkpoint of this trainer); start "
                                 "clean with --no-resume --overwrite, or use another output_dir")
            check_same_run(read_json(record), cfg, fingerprint, out, f"from {ckpt}")
            check_checkpoint_sums(ckpt)
            check_pickles(ckpt)
        elif (out / "run.json").is_file():  # a run that stopped before its first checkpoint
            check_same_run(read_json(out / "run.json"), cfg, fingerprint, out, f"the run in {out}")
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    started = {k: v for k, v in run_record(cfg, fingerprint, 0).items() if k != "step"}
    atomic_write_text(out / "run.json", json.dumps(started, indent=1) + "\n")
    return ckpt.name if ckpt is not None else None


def run_record(cfg: dict, fingerprint: dict | None, step: int) -> dict:
    """What ``run.json`` records: the resolved config, the data fingerprint, the step."""
    return {"format": 1, "step": step, "config": _jsonable(cfg), "data": fingerprint}


def check_same_run(recorded: dict, cfg: dict, fingerprint: dict, out: Path, what: str) -> None:
    """Refuses to resume ``what`` when the recorded run (``run.json``) differs from this config
    and data other than in ``RESUME_MAY_CHANGE``, naming what differs."""
    diffs = run_differences(recorded, cfg, fingerprint)
    if diffs:
        raise ValueError(
            f"cannot resume {what}: {'; '.join(diffs)}. Only {', '.join(sorted(RESUME_MAY_CHANGE))}"
            f" may change on resume (docs/resume.md); start clean with --no-resume --overwrite "
            f"(the old run is moved aside to {out.name}.replaced-<time>), or use another "
            "output_dir")


def data_fingerprint(cfg: dict) -> dict[str, str]:
    """sha256 of the bytes the trainer reads, per data key: each manifest, and each behaviors
    folder's record files (plus its teacher states when ``data.teacher_cache`` reads them:
    ``BehaviorsFolder.fingerprint_files``). Contents, not paths or times: a folder that moved, or a
    file rewritten with the same bytes, is the same data. Audio files are known by their
    manifest lines (path, duration), not read."""
    d = cfg["data"]
    if d["reader"] == "streaming":  # the index holds every shard file's sha256
        files = {"data.train_shards": [Path(d["train_shards"]) / "shards.json"]}
    else:
        files = {"data.train_manifest": [Path(d["train_manifest"])],
                 "data.behaviors": BehaviorsFolder(d["behaviors"]).fingerprint_files(d["teacher_cache"])}
    if d["eval_manifest"] and d["eval_behaviors"]:
        files["data.eval_manifest"] = [Path(d["eval_manifest"])]
        files["data.eval_behaviors"] = BehaviorsFolder(d["eval_behaviors"]).fingerprint_files(False)
    out = {key: sha256_files(paths, names=len(paths) > 1 or key.endswith("behaviors"), separator=b"\0")
           for key, paths in files.items()}
    return {**out, **model_fingerprint(cfg)}


def model_fingerprint(cfg: dict) -> dict[str, str]:
    """The commit each hub model source resolved to (``"hub:ID@sha"``), keyed ``model.llm`` /
    ``model.encoder``: a branch or tag that moved upstream is another model."""
    from mtbi_fast.hub import hub_commit

    out = {}
    for key in ("encoder", "llm"):
        commit = hub_commit(cfg["model"].get(key) or {"tiny": {}}, key)
        if commit is not None:
            out[f"model.{key}"] = commit
    return out


def run_differences(recorded: dict, cfg: dict, fingerprint: dict) -> list[str]:
    """What differs between a recorded run (``run.json``) and this config and data, other than
    the keys in ``RESUME_MAY_CHANGE``: "key (old -> new)" items."""
    from mtbi_fast.config import DEFAULTS

    old, new = _flatten(recorded.get("config", {})), _flatten(_jsonable(cfg))
    defaults = _flatten(DEFAULTS)  # a key added since, or now spelled out, at its default
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_MAY_CHANGE or key in DATA_KEYS:
            continue
        if key not in old and new.get(key) == IMPLIED_BEFORE.get(key, defaults.get(key, _MISSING)):
            continue  # a key added after the run began, at the value the run had
        if old.get(key, _MISSING) != new.get(key, _MISSING):
            diffs.append(f"{key} ({_short(old.get(key, _MISSING))} -> {_short(new.get(key, _MISSING))})")
    was = recorded.get("data") or {}
    for key in sorted(set(was) | set(fingerprint)):
        if key.startswith("model.") and key not in was:
            continue  # recorded before hub commits were: the config's own keys still compare
        if was.get(key) != fingerprint.get(key):
            state = "not used" if key not in fingerprint else "not used before" if key not in was \
                else f"{was[key]} -> {fingerprint[key]}" if key.startswith("model.") else "other contents"
            diffs.append(f"{key} ({state})")
    return diffs


def read_json(path: Path) -> dict:
    """A JSON file of the run folder; unreadable: a user error naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot resume: {path} is not readable JSON ({exc})") from None


def checkpoint_step(folder: Path, steps: int) -> int:
    """The step of checkpoint ``folder`` (``checkpoints/step-N``), from its ``run.json``: an int
    >= 1 that equals the N of the folder's name and is at most the run's ``train.steps``;
    anything else is a user error naming the file and the key."""
    path = folder / "run.json"
    step = read_json(path).get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"cannot resume: {path}: step must be an integer, got {step!r}")
    named = int(folder.name[5:]) if folder.name[5:].isdigit() else None
    if step < 1 or step != named:
        raise ValueError(f"cannot resume: {path}: step is {step}, but the checkpoint is {folder.name}")
    if step > steps:
        raise ValueError(f"cannot resume: {path}: step {step} is past train.steps={steps} (train longer "
                         f"with train.steps={step} or more, or start clean with --no-resume)")
    return step


def check_checkpoint_sums(folder: Path) -> None:
    """Every file of checkpoint ``folder`` has the sha256 its ``COMPLETE`` recorded when it was
    written (one read of the checkpoint, which resume reads anyway): a flipped byte in a weight
    file would otherwise load. A checkpoint of an older mtbi-fast (``COMPLETE`` holds the step
    alone) has no sums to compare."""
    try:
        recorded = json.loads((folder / "COMPLETE").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), dict):
        return
    for rel, want in recorded["sha256"].items():
        f = folder / rel
        if not f.is_file():
            raise ValueError(f"cannot resume: {f} is missing (listed in {folder / 'COMPLETE'})")
        if sha256_files([f], names=False, separator=b"\0") != want:
            raise ValueError(f"cannot resume: {f}: its sha256 differs from the one {folder / 'COMPLETE'} "
                             f"recorded when the checkpoint was written (the file changed); resume from an "
                             f"earlier checkpoint by removing this one, or start clean with --no-resume --overwrite")


def check_tensor(path: Path, key: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """A tensor read from ``path`` has the dtype and shape of the one it replaces (a header that
    declares another dtype, or a transposed moment, would otherwise load): else a user error
    naming the file and the key."""
    if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"cannot resume: {path}: {key} is {str(got.dtype).removeprefix('torch.')} "
                         f"{tuple(got.shape)}, expected {str(want.dtype).removeprefix('torch.')} "
                         f"{tuple(want.shape)}")


# ---- checkpoints --------------------------------------------------------------------------------

def complete_checkpoints(root: Path) -> list[Path]:
    """The complete ``step-N`` folders under ``root``, oldest first (a save in progress has a
    temporary name; a folder without COMPLETE, left by an older version, is not one)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()
             and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def publish_checkpoint(tmp: Path, name: str, record: dict, keep_last: int) -> None:
    """Finish a checkpoint written under the temporary folder ``tmp``: its ``run.json`` and
    ``COMPLETE``, renamed to ``name``, then named by ``latest`` (DeepSpeed's tag file; ours too);
    only the last ``keep_last`` complete checkpoints are kept."""
    root = tmp.parent
    atomic_write_text(tmp / "run.json", json.dumps(record, indent=1) + "\n")
    # the sha256 of every file: what resume checks before it loads any of them
    sums = {str(f.relative_to(tmp)): sha256_files([f], names=False, separator=b"\0") for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / "COMPLETE").write_text(json.dumps({"step": record["step"], "sha256": sums}, indent=1) + "\n")
    shutil.rmtree(root / name, ignore_errors=True)
    tmp.rename(root / name)
    atomic_write_text(root / "latest", name)
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_trainer_state(folder: Path, model, optimizer, scheduler, step: int) -> None:
    """The plain (non-DeepSpeed) trainer state without pickle: tensors (trained weights,
    optimizer state, RNG states) in ``trainer.safetensors``, the rest in ``trainer.json``."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous()
               for k, v in model.trainable_state_dict().items()}
    opt = optimizer.state_dict()
    state = {}
    for idx, entry in opt["state"].items():
        state[str(idx)] = {"tensors": [], "values": {}}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{idx}.{k}"] = v.detach().cpu().contiguous()
                state[str(idx)]["tensors"].append(k)
            else:
                state[str(idx)]["values"][k] = v
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    save_file(tensors, str(folder / "trainer.safetensors"))
    meta = {"format": 1, "step": step,
            "optimizer": {"param_groups": opt["param_groups"], "state": state},
            "scheduler": scheduler.state_dict()}
    atomic_write_text(folder / "trainer.json", json.dumps(meta) + "\n")


def load_trainer_state(folder: Path, model, optimizer, scheduler, expected_step: int | None = None) -> None:
    """What ``save_trainer_state`` wrote, into the model, optimizer and scheduler, and the RNG
    states; a file that is not what it should be (another dtype or shape than the module's, a
    step other than ``expected_step``) is a user error naming it and the key."""
    files = (folder / "trainer.safetensors", folder / "trainer.json")
    try:
        tensors = load_file(str(files[0]))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"cannot resume: {files[0]} is not a readable safetensors file "
                         f"({exc})") from None
    meta = read_json(files[1])
    trained = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = set(model.trainable_state_dict())
    if set(trained) != expected:
        raise ValueError(f"cannot resume: {files[0]} holds other trained weights than this model "
                         f"(missing {sorted(expected - set(trained))[:3]}, unexpected "
                         f"{sorted(set(trained) - expected)[:3]})")
    current = model.trainable_state_dict()
    for k, v in trained.items():
        check_tensor(files[0], f"model.{k}", v, current[k])
    step = meta.get("step") if isinstance(meta, dict) else None
    if expected_step is not None and (isinstance(step, bool) or step != expected_step):
        raise ValueError(f"cannot resume: {files[1]}: step is {step!r}, but the checkpoint's run.json "
                         f"says {expected_step}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        state = {int(i): {**e["values"], **{k: tensors[f"optimizer.{i}.{k}"] for k in e["tensors"]}}
                 for i, e in meta["optimizer"]["state"].items()}
        groups = meta["optimizer"]["param_groups"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"cannot resume: {files[1]}: the optimizer state is not what the trainer "
                         f"wrote ({type(exc).__name__}: {exc})") from None
    for i, entry in state.items():
        if not 0 <= i < len(params):
            raise ValueError(f"cannot resume: {files[1]}: optimizer state for parameter {i}, but "
                             f"the optimizer has {len(params)}")
        for k, v in entry.items():
            if k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                check_tensor(files[0], f"optimizer.{i}.{k}", v, params[i].detach().float())
            elif k == "step" and isinstance(v, torch.Tensor) and (v.numel() != 1 or not v.is_floating_point()):
                raise ValueError(f"cannot resume: {files[0]}: optimizer.{i}.step must be one float, got "
                                 f"{v.dtype} {tuple(v.shape)}")
    model.load_state_dict(trained, strict=False)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(meta["scheduler"])
    rng = tensors.get("rng.cpu")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise ValueError(f"cannot resume: {files[0]}: rng.cpu must be a 1-D uint8 tensor")
    torch.set_rng_state(rng)
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---- nothing unpickled --------------------------------------------------------------------------

def save_stream_positions(folder: Path, rank: int, world: int, workers: int, positions: dict) -> None:
    """``data-rank-R.json``: where rank R's streaming readers are (``mtbi_fast.streaming``),
    with the world size and worker count that define which shards each reader reads."""
    record = {"world": world, "num_workers": workers, "positions": positions}
    atomic_write_text(folder / f"data-rank-{rank}.json", json.dumps(record, indent=1))


def load_stream_positions(folder: Path, rank: int, world: int, workers: int) -> dict:
    """Rank ``rank``'s reader positions saved in checkpoint ``folder``; the readers must be the
    same ones (same ranks and ``data.num_workers``), since they define who reads which shards."""
    path = folder / f"data-rank-{rank}.json"
    if not path.is_file():
        raise ValueError(f"cannot resume the streaming reader: {path} is missing (the checkpoint "
                         f"was made by an in-memory run or by fewer ranks)")
    record = read_json(path)
    readers = record.get("num_workers")
    if record.get("world") != world or not isinstance(readers, int) or max(1, readers) != max(1, workers):
        raise ValueError(f"cannot resume the streaming reader from {folder}: it was saved by "
                         f"{record.get('world')} rank(s) x data.num_workers={record.get('num_workers')}, "
                         f"this run has {world} x {workers}; the shards each reader reads depend on "
                         f"both (0 and 1 workers are the same readers), so resume with the same ones")
    positions = record.get("positions")
    if not isinstance(positions, dict) or not all(
            isinstance(v, dict) and all(isinstance(v.get(k), int) for k in ("epoch", "cut", "batch"))
            for v in positions.values()):
        raise ValueError(f"{path}: positions must map readers to {{epoch, cut, batch}} integers")
    return positions


def check_pickles(folder: Path) -> None:
    """Every ``*.pt`` under ``folder`` loads as tensors and plain data (``torch.load`` with
    ``weights_only=True``, DeepSpeed's few state classes allowed, ``DEEPSPEED_SAFE_GLOBALS``),
    so nothing in it runs code when DeepSpeed loads it; otherwise an error naming the file.
    Zip-format files are memory-mapped: the check reads the pickles, not the tensor data."""
    for path in sorted(folder.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as exc:  # noqa: BLE001 - the unpickler's errors are of many types
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
            first = next((ln for ln in lines if "GLOBAL" in ln), lines[0])  # the type it refused
            raise ValueError(f"refusing to resume: {path} does not load as plain tensors and data "
                             f"(torch.load weights_only=True: {first}); it may run code when "
                             "unpickled, so it is not loaded") from None


@contextlib.contextmanager
def weights_only_deepspeed_loads(engine):
    """While open, the DeepSpeed engine's checkpoint engine loads with ``weights_only=True``
    (and only DeepSpeed's safe state classes): it would otherwise unpickle with
    ``weights_only=False``. Checked files are loaded this way too, so a file swapped after the
    check cannot run code either."""
    ce = engine.checkpoint_engine
    allowed = deepspeed_safe_globals()

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load
    try:
        yield
    finally:
        del ce.load


def deepspeed_safe_globals() -> list:
    """The classes of ``DEEPSPEED_SAFE_GLOBALS`` that the installed DeepSpeed has."""
    out = []
    for spec in DEEPSPEED_SAFE_GLOBALS:
        module, name = spec.split(":")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # deepspeed absent, or a version without it
            continue
    return out


# ---- metrics ------------------------------------------------------------------------------------

def trim_metrics(out: Path, step: int) -> None:
    """Drop the rows of ``out/metrics.jsonl`` that a run starting at ``step`` writes again: those
    after the resumed checkpoint, or all of them when it starts at step 0 (the step-0 evaluation
    included). A row cut short by a kill is dropped too."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if step > 0 and isinstance(row, dict) and row.get("step", math.inf) <= step:
            rows.append(line)
    atomic_write_text(path, "".join(r + "\n" for r in rows))


# ---- helpers ------------------------------------------------------------------------------------

_MISSING = "<missing>"


def _start_clean(out: Path, overwrite: bool) -> None:
    """A fresh start in ``out``: refused when it holds a run, unless ``overwrite`` (moved aside)."""
    previous = _contents(out)
    if previous and not overwrite:
        raise ValueError(
            f"--no-resume: {_named(out)} already holds a run ({_listing(previous)}); resume it "
            f"(without --no-resume), use another output_dir, or add --overwrite to move it aside "
            f"to {out.name}.replaced-<time>")
    if previous:
        what = "run" if is_run_folder(out) else "contents"
        moved = move_aside(out, first="checkpoints", keep=lambda p: p.name == LOCK_NAME)
        print(f"moved the previous {what} of {out} to {moved}")


def is_run_folder(out: Path) -> bool:
    """``out`` holds a run of this trainer: a ``run.json`` that is a run record."""
    try:
        record = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "config" in record and "format" in record


def _contents(out: Path) -> list[str]:
    """What ``out`` holds, besides the trainer's lock and write probes."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and not p.name.startswith(WRITE_PROBE))


def _listing(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")


def _named(out: Path) -> str:
    return f"{out} (a link to {out.resolve()})" if out.is_symlink() else str(out)


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(v) -> str:
    text = v if v is _MISSING else json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."
