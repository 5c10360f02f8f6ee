"""``mtbi-fast export`` (mtbi_fast/export.py, mtbi_fast/hf_code): a trained run as a transformers
folder that loads without mtbi-fast, giving the same logits and answers as ``mtbi-fast infer``."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mtbi_fast.audio import load_audio
from mtbi_fast.cli import main as cli
from mtbi_fast.model import SpeechLLM
from mtbi_fast.prompts import prompt_halves

from helpers import CONFIG, ROOT, overrides

CLIP = ROOT / "tests" / "data" / "clip1.flac"
PROMPT = "Repeat what you hear: {speech}"
NEW_TOKENS = 12

# Loads exported folders in a process where `import mtbi_fast` fails; prints, per folder, the
# logits of PROMPT about CLIP and the greedy answer.
LOADER = textwrap.dedent('''
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("mtbi_fast", "mtbi_kernels"):
                raise ImportError("blocked for this test: " + name)

    sys.meta_path.insert(0, Block())
    try:
        import mtbi_fast  # noqa: F401
        raise SystemExit("mtbi_fast imported")
    except ImportError:
        pass
    import soundfile, torch
    from transformers import AutoFeatureExtractor, AutoModel, AutoTokenizer

    clip, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    wave, rate = soundfile.read(clip, dtype="float32")
    assert rate == 16000
    out = {}
    for folder in sys.argv[4:]:
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        feats = AutoFeatureExtractor.from_pretrained(folder)
        inputs = model.prepare_inputs(tok, feats, [wave], [prompt])
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        answer = model.answer([wave], [prompt], tok, feats, max_new_tokens=new_tokens)[0]
        out[folder] = {"logits": logits.tolist(), "answer": answer, "class": type(model).__name__,
                       "dtype": str(next(model.parameters()).dtype)}
    print("RESULT " + json.dumps(out))
''')


def load_outside(tmp_path, *folders):
    """{folder: {"logits", "answer", ...}} from a fresh process that cannot import mtbi_fast."""
    script = tmp_path / "load_exported.py"
    script.write_text(LOADER)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(script), str(CLIP), PROMPT, str(NEW_TOKENS),
                           *map(str, folders)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    return {Path(k): {**v, "logits": torch.tensor(v["logits"])} for k, v in json.loads(line[7:]).items()}


def mtbi_logits(folder, dtype=None) -> torch.Tensor:
    """The LLM's logits [L, V] for PROMPT about CLIP, computed by mtbi-fast itself (with every
    weight in ``dtype`` when given)."""
    model = SpeechLLM.from_pretrained(folder).eval()
    if dtype is not None:
        model.to(dtype)
    frames = model.speech_frames([model.features(load_audio(CLIP))])[0]
    before, after = prompt_halves(model.tokenizer, PROMPT)
    embed = model.llm.get_input_embeddings()
    with torch.no_grad():
        x = torch.cat([embed(torch.tensor(before)), frames.to(embed.weight.dtype), embed(torch.tensor(after))])
        return model.llm(inputs_embeds=x[None]).logits[0].float()


def infer_answer(run, capsys) -> str:
    capsys.readouterr()
    assert cli(["infer", "--model", str(run), "--audio", str(CLIP), "--prompt", PROMPT, "--no-stream",
                "--max-new-tokens", str(NEW_TOKENS)]) == 0
    return capsys.readouterr().out.split("\n", 1)[1].strip()


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Two tiny runs trained a few steps: plain, and with LoRA on the LLM."""
    root = tmp_path_factory.mktemp("export-runs")
    out = {}
    for name, extra in (("plain", []), ("lora", ["model.lora={r: 4, lora_alpha: 8, target_modules: "
                                                  "[q_proj, v_proj, down_proj]}", "train.lr=0.02"])):
        run = root / name
        assert cli(["train", str(CONFIG), *overrides(data, run, "train.steps=4", "train.eval_every=100",
                                                     "train.save_every=100", "model.dtype=float32",
                                                     *extra)]) == 0
        out[name] = run
    return out


def test_exported_runs_load_without_mtbi_fast_and_match_infer(runs, tmp_path, capsys):
    pytest.importorskip("peft")
    exported = {}
    for name, flags in (("plain", []), ("lora-merged", ["--merge-lora"]), ("lora-peft", [])):
        run = runs["plain" if name == "plain" else "lora"]
        exported[name] = tmp_path / name
        assert cli(["export", str(run), "-o", str(exported[name]), *flags]) == 0
    printed = capsys.readouterr().out
    assert "trust_remote_code=True" in printed
    for name, folder in exported.items():
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "configuration_mtbi_speech.py", "modeling_mtbi_speech.py",
                "tokenizer.json", "preprocessor_config.json", "generation_config.json", "README.md"} <= files, name
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == "modeling_mtbi_speech.MtbiSpeechForConditionalGeneration"
        assert (config["lora"] is not None) == (name == "lora-peft")
    # the LoRA run's adapters did move: merging them changes the LLM
    lora_b = [p for n, p in SpeechLLM.from_pretrained(runs["lora"] / "final").named_parameters() if "lora_B" in n]
    assert lora_b and max(float(p.detach().abs().max()) for p in lora_b) > 1e-3

    got = load_outside(tmp_path, *exported.values())
    for name, folder in exported.items():
        run = runs["plain" if name == "plain" else "lora"]
        want = mtbi_logits(run / "final")
        have = got[folder]["logits"]
        assert got[folder]["class"] == "MtbiSpeechForConditionalGeneration"
        assert have.shape == want.shape, name
        torch.testing.assert_close(have, want, atol=2e-4, rtol=1e-4, msg=name)
        assert got[folder]["answer"].strip() == infer_answer(run, capsys), name
    # merged LoRA == peft LoRA
    torch.testing.assert_close(got[exported["lora-merged"]]["logits"], got[exported["lora-peft"]]["logits"],
                               atol=2e-4, rtol=1e-4)
    # infer takes the run, not its export: one line naming the folder and what to do
    capsys.readouterr()
    assert cli(["infer", "--model", str(exported["plain"]), "--audio", str(CLIP), "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtbi-fast: error: ") and "\n" not in err
    assert f"{exported['plain']} is a transformers model folder (model_type 'mtbi_speech'" in err
    assert f"`mtbi-fast serve {exported['plain']}` answers with it" in err


def test_a_waveform_encoder_run_exports_and_matches_infer(data, tmp_path, capsys):
    """A run with a HuBERT encoder (mtbi_fast.encoders) exports with a wav2vec2 feature extractor
    and loads without mtbi-fast, with mtbi-fast's logits and infer's answer."""
    run = tmp_path / "hubert"
    assert cli(["train", str(CONFIG), *overrides(data, run, "train.steps=3", "train.eval_every=100",
                                                 "train.save_every=100", "model.dtype=float32",
                                                 "model.encoder={tiny: {model_type: hubert}}")]) == 0
    folder = tmp_path / "hubert-export"
    assert cli(["export", str(run), "-o", str(folder)]) == 0
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["feature_extractor_type"] == "Wav2Vec2FeatureExtractor" and pre["do_normalize"] is True
    assert json.loads((folder / "config.json").read_text())["encoder_config"]["model_type"] == "hubert"
    got = load_outside(tmp_path, folder)[folder]
    want = mtbi_logits(run / "final")
    assert got["logits"].shape == want.shape
    torch.testing.assert_close(got["logits"], want, atol=2e-4, rtol=1e-4)
    assert got["answer"].strip() == infer_answer(run, capsys)


def test_bf16_export_is_within_bf16_of_the_run(runs, tmp_path):
    folder = tmp_path / "bf16"
    assert cli(["export", str(runs["plain"]), "-o", str(folder), "--dtype", "bf16"]) == 0
    got = load_outside(tmp_path, folder)[folder]
    assert got["dtype"] == "torch.bfloat16"
    want = mtbi_logits(runs["plain"] / "final")
    # the reference error: the same model cast to bf16 inside mtbi-fast
    own = mtbi_logits(runs["plain"] / "final", torch.bfloat16)

    def err(x):
        return float((x - want).abs().mean() / want.std())

    assert 0 < err(got["logits"]) <= 1.5 * err(own) + 0.01, (err(got["logits"]), err(own))
    agree = lambda x: float(x.argmax(-1).eq(want.argmax(-1)).float().mean())  # noqa: E731
    assert agree(got["logits"]) >= agree(own) - 0.1, (agree(got["logits"]), agree(own))


def test_model_card_names_models_config_data_and_evaluation(runs, tmp_path):
    run = runs["plain"]
    report = tmp_path / "eval.md"
    report.write_text("| model | split | chrF |\n|---|---|---|\n| mtbi | seen | 12.3 |\n")
    folder = tmp_path / "card"
    assert cli(["export", str(run), "-o", str(folder), "--eval-report", str(report)]) == 0
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| speech encoder | a random tiny model (tests) |" in card
    assert "| mtbi | seen | 12.3 |" in card
    recorded = json.loads((run / "run.json").read_text())["data"]
    assert recorded and all(f"`{v}`" in card for v in recorded.values())
    assert (run / "config.yaml").read_text().strip() in card


def test_export_refuses_a_non_empty_folder_and_replaces_it_atomically(runs, tmp_path, capsys, monkeypatch):
    import mtbi_fast.export as export_mod

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert cli(["export", str(runs["plain"]), "-o", str(folder)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (folder / "keep.txt").read_text() == "mine"
    # a failure while writing leaves the old folder as it was, and no temporary folder behind
    monkeypatch.setattr(export_mod, "model_card", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export_mod.export(runs["plain"], folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == ["out"]
    assert (folder / "keep.txt").read_text() == "mine"
    monkeypatch.undo()
    assert cli(["export", str(runs["plain"]), "-o", str(folder), "--overwrite"]) == 0
    assert not (folder / "keep.txt").exists() and (folder / "model.safetensors").is_file()
    assert cli(["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2
    assert "neither a run folder with final/ nor a save_pretrained folder" in capsys.readouterr().err
    assert cli(["export", str(runs["plain"]), "-o", str(tmp_path / "y"), "--dtype", "int8"]) == 2
    assert "--dtype must be one of float32, fp32, bfloat16, bf16, float16, fp16, got 'int8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--as must be one of mtbi, audioflamingo3, got 'onnx'"):
        export_mod.export(runs["plain"], tmp_path / "z", as_="onnx")
    with pytest.raises(FileNotFoundError, match=r"is not an exported model folder \(no config.json\)"):
        export_mod.push_to_hub(tmp_path / "nothing", "me/x")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_tied_embeddings_stay_tied(tmp_path):
    """An LLM whose head is its embedding table (SmolLM2, Qwen2.5 small) exports once and loads tied."""
    from transformers import AutoModel

    import yaml

    from mtbi_fast.model import ModelConfig

    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    cfg["llm"] = {"tiny": {"tie_word_embeddings": True}}
    model = SpeechLLM.from_config(ModelConfig.from_dict(cfg))
    model.save_pretrained(tmp_path / "saved")
    cli(["export", str(tmp_path / "saved"), "-o", str(tmp_path / "tied")])
    loaded = AutoModel.from_pretrained(tmp_path / "tied", trust_remote_code=True)
    lm = loaded.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(lm.lm_head.weight, model.llm.get_input_embeddings().weight)


def test_push_to_hub_uploads_the_folder(runs, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw["private"]))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    folder = tmp_path / "pushed"
    assert cli(["export", str(runs["plain"]), "-o", str(folder), "--push-to-hub", "me/tiny", "--private"]) == 0
    assert calls[0] == ("create", "me/tiny", True)
    assert calls[1][0] == "upload" and "model.safetensors" in calls[1][2] and "README.md" in calls[1][2]


def test_audioflamingo3_export_loads_in_plain_transformers_within_its_measured_bound(data, tmp_path):
    """``--as audioflamingo3``: transformers' own class, no remote code. Its encoder pads every clip
    to 30 s with a mask (mtbi-fast encodes the true length): only the frames at the clip's end see
    other inputs. Measured on this tiny run: max |logit diff| 2.6% of the logits' spread (printed with -s), the
    argmax the same at all but near-tied positions (docs/export.md)."""
    import numpy as np
    import soundfile as sf
    from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

    run = tmp_path / "run"
    assert cli(["train", str(CONFIG), *overrides(data, run, "train.steps=4", "train.eval_every=100",
                                                 "train.save_every=100", "model.dtype=float32",
                                                 "model.adapter={kind: audioflamingo3}")]) == 0
    folder = tmp_path / "af3"
    assert cli(["export", str(run), "-o", str(folder), "--as", "audioflamingo3"]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "audioflamingo3" and "auto_map" not in config
    assert not list(folder.glob("*.py"))  # nothing to trust: no remote code
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    wave, _ = sf.read(str(CLIP), dtype="float32")
    wave = wave[: len(wave) // 320 * 320]  # whole mel frames: both count the same speech frames
    text = "User: " + PROMPT.replace("{speech}", "<sound>") + "\nAssistant:"  # the tiny tokenizer's format
    inputs = processor(text=[text], audio=[wave])
    inputs.pop("num_audio_tokens", None)
    with torch.no_grad():
        got = model(**inputs).logits[0].float()

    mtbi = SpeechLLM.from_pretrained(run / "final").eval()
    frames = mtbi.speech_frames([mtbi.features(torch.from_numpy(np.ascontiguousarray(wave)))])[0]
    before, after = prompt_halves(mtbi.tokenizer, PROMPT)
    embed = mtbi.llm.get_input_embeddings()
    with torch.no_grad():
        x = torch.cat([embed(torch.tensor(before)), frames, embed(torch.tensor(after))])
        want = mtbi.llm(inputs_embeds=x[None]).logits[0].float()
    assert got.shape[0] == want.shape[0] and got.shape[1] == want.shape[1] + 1  # + the <sound> row
    got = got[:, : want.shape[1]]
    torch.testing.assert_close(got[: len(before)], want[: len(before)], atol=1e-5, rtol=1e-5)  # text only
    spread = float((got - want).abs().max() / want.std())
    print(f"audioflamingo3 export: max |logit diff| {float((got - want).abs().max()):.4f} = {spread:.1%} of the "
          f"logits' std; argmax agreement {float(got.argmax(-1).eq(want.argmax(-1)).float().mean()):.0%}")
    assert spread < 0.05
    # an argmax may differ only where the run's top two logits are closer than the two sides differ
    # there (a near-tie the measured difference explains); every other position agrees
    flipped = (got.argmax(-1) != want.argmax(-1)).nonzero().flatten()
    for r in flipped.tolist():
        gap = float(want[r].max() - want[r, got[r].argmax()])
        assert gap <= 2 * float((got[r] - want[r]).abs().max()), (r, gap)
    assert len(flipped) <= max(1, want.shape[0] // 20)
    # a run with another adapter is refused by name
    with pytest.raises(ValueError, match=r"--as audioflamingo3 needs a run trained with model.adapter.kind: audioflamingo3"):
        from mtbi_fast.export import export

        export(_plain_run(data, tmp_path), tmp_path / "x", as_="audioflamingo3")


def _plain_run(data, tmp_path):
    run = tmp_path / "plain"
    assert cli(["train", str(CONFIG), *overrides(data, run, "train.steps=1", "train.eval_every=100",
                                                 "train.save_every=100")]) == 0
    return run
