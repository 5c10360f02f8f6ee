"""The run config (mtbi_fast/config.py): one-line errors naming the key or the file, the typed
sections the trainer reads, ``defaults:`` base files, and the shipped configs."""

import dataclasses
import re

import pytest
import yaml

from mtbi_fast.config import SECTIONS, RunConfig, load_config, model_section
from mtbi_fast.model import ModelConfig

from helpers import CONFIG, ROOT

PATHS = ["data.train_manifest=a", "data.behaviors=b", "output_dir=c"]


@pytest.mark.parametrize("extra, message", [
    (["train.lrr=0.1"], r"unknown key train.lrr"),
    (["train.steps=ten"], r"train.steps must be int, got str 'ten'"),
    (["optimizer.lr=1"], r"unknown key 'optimizer'"),
    (["train.grad_accum=0"], r"train.grad_accum must be an int >= 1, got 0"),
    (["data.num_workers=-1"], r"data.num_workers must be an int >= 0, got -1"),
    (["data.num_workers=two"], r"data.num_workers must be int, got str 'two'"),
    (["data.num_workers=true"], r"data.num_workers must be int, got bool True"),
    (["data.prefetch_factor=0"], r"data.prefetch_factor must be an int >= 1, got 0"),
    (["data.prefetch_factor=1.5"], r"data.prefetch_factor must be int, got float 1.5"),
    (["model.adapter={strid: 4}"], r"unknown key model.adapter.strid"),
    (["interleave.schedule=step"], r"interleave.schedule must be one of"),
    (["trainsteps"], r"override 'trainsteps' must look like section.key=value"),
    (["data.spec_augment={time_mask: 2}"], r"unknown key data.spec_augment.time_mask \(allowed: "),
    (["data.spec_augment={freq_masks: 1.5}"], r"data.spec_augment.freq_masks must be an integer >= 0, got 1.5"),
    (["data.spec_augment={time_width: -1}"], r"data.spec_augment.time_width must be a number >= 0"),
    (["data.spec_augment=true"], r"data.spec_augment must be dict or null, got bool True"),
    # ranges: every numeric key, the error names it
    (["train.keep_last=-1"], r"train.keep_last must be an int >= 1, got -1"),
    (["train.keep_last=0"], r"train.keep_last must be an int >= 1, got 0"),
    (["train.save_every=-1"], r"train.save_every must be an int >= 0, got -1"),
    (["train.log_every=0"], r"train.log_every must be an int >= 1, got 0"),
    (["train.eval_every=-2"], r"train.eval_every must be an int >= 0, got -2"),
    (["train.eval_examples=0"], r"train.eval_examples must be an int >= 1, got 0"),
    (["train.warmup_steps=-1"], r"train.warmup_steps must be an int >= 0, got -1"),
    (["train.seed=-3"], r"train.seed must be an int >= 0 and <= 9223372036854775807, got -3"),
    (["train.seed=1000000000000000000000000000000"], r"train.seed must be an int >= 0 and <= 9223372036854775807, got 1000000000000000000000000000000"),
    (["train.lr=0"], r"train.lr must be a finite number > 0 and <= 10, got 0"),
    (["train.lr=.nan"], r"train.lr must be a finite number > 0 and <= 10, got nan"),
    (["train.lr=1.0e+300"], r"train.lr must be a finite number > 0 and <= 10, got 1e\+300"),
    (["train.weight_decay=-0.1"], r"train.weight_decay must be a finite number >= 0 and <= 10, got -0.1"),
    (["train.clip_grad=0"], r"train.clip_grad must be a finite number > 0 and <= 1e\+06 \(or null\), got 0"),
    (["packing.examples_per_step=0"], r"packing.examples_per_step must be an int >= 1, got 0"),
    (["packing.max_tokens=1"], r"packing.max_tokens must be an int >= 2, got 1"),
    (["packing.overlong=cut"], r"packing.overlong must be 'error' or 'truncate', got 'cut'"),
    (["interleave.mean_span=0"], r"interleave.mean_span must be a finite number > 0, got 0"),
    (["model.adapter.stride=0"], r"model.adapter.stride must be an int >= 1, got 0"),
    (["model.max_audio_seconds=-5"], r"model.max_audio_seconds must be a finite number > 0"),
    (["model.loss.chunk_size=0"], r"model.loss.chunk_size must be an int >= 1 \(or null\), got 0"),
    (["model.loss.temperature=.inf"], r"model.loss.temperature must be a number in \[0.001, 1000\], got inf"),
    (["model.loss.temperature=1.0e-300"], r"model.loss.temperature must be a number in \[0.001, 1000\], got 1e-300"),
    (["model.loss.kl_weight=-1"], r"model.loss.kl_weight must be a finite number >= 0 and <= 1000, got -1"),
    (["model.loss.ce_weight=-0.5"], r"model.loss.ce_weight must be a finite number >= 0 and <= 1000, got -0.5"),
    # one-line errors for what YAML or a section cannot hold
    (["train=5"], r"train must be a mapping of keys \(e.g. train.steps=5\), got 5"),
    (["train.lr=!!python/object:os.system x"], r"override 'train.lr=!!python/object:os.system x': not a YAML value: could not determine a constructor for the tag"),
    (["train.lr=[1"], r"override 'train.lr=\[1': not a YAML value: .* at line 1, column 3"),
    (["model.loss.kl_weight=0"], r"model.loss.kl_weight and model.loss.ce_weight are both 0"),
    (["model.loss.chunksize=8"], r"unknown key model.loss.chunksize"),
    (["model.loss.backend=fast"], r"model.loss: backend must be one of"),
])
def test_config_errors(extra, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIG, [*PATHS, *extra])


def test_config_file_errors_are_one_line_naming_the_file(tmp_path):
    """YAML syntax errors and tags name the file, line and column; a number written the way
    people write it (1e-4, which YAML 1.1 reads as a string) is taken as that number."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {llm: {tiny: {}}\ntrain: [\n")
    with pytest.raises(ValueError, match=rf"{bad}: not a valid config: .* at line \d+, column \d+"):
        load_config(bad)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("model: !!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(ValueError, match=rf"{tagged}: not a valid config: could not determine a constructor"):
        load_config(tagged)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=rf"{listed}: a config is a mapping of sections, got list"):
        load_config(listed)
    cfg = load_config(CONFIG, ["data.train_manifest=a", "data.behaviors=b", "output_dir=c", "train.lr=1e-4",
                               "model.loss.temperature=2E0"])
    assert cfg["train"]["lr"] == 1e-4 and cfg["model"]["loss"]["temperature"] == 2.0


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_run_config_is_the_checked_mapping_as_typed_sections(tmp_path):
    """A config that names only what it must gets the documented defaults, and the typed
    sections the trainer reads hold exactly what config.yaml records."""
    minimal = tmp_path / "minimal.yaml"
    minimal.write_text("model: {encoder: {tiny: {}}, llm: {tiny: {}}}\n"
                       "data: {train_manifest: m.jsonl, behaviors: beh}\noutput_dir: out\n")
    cfg = load_config(minimal, ["train.lr=1e-4", "packing.token_budget=null"])
    run = RunConfig.from_dict(cfg)
    assert (run.train.steps, run.train.lr, run.train.grad_accum, run.train.report_to) == (1000, 1e-4, 1, ["tensorboard"])
    assert (run.data.reader, run.data.num_workers, run.data.prefetch_factor) == ("memory", 2, 2)
    assert (run.packing.max_tokens, run.packing.examples_per_step, run.packing.overlong) == (1024, 8, "truncate")
    assert run.interleave.schedule_args() == {"schedule": "cosine", "start": 0.8, "end": 0.0, "steps": 1000}
    assert run.deepspeed is None and run.output_dir == "out"
    for name in SECTIONS:
        assert dataclasses.asdict(getattr(run, name)) == cfg[name], name
    assert run.model == ModelConfig.from_dict(cfg["model"])
    # a mutable default is each instance's own
    a, b = RunConfig.from_dict(load_config(minimal)), RunConfig.from_dict(load_config(minimal))
    a.train.report_to.append("wandb")
    assert b.train.report_to == ["tensorboard"]


def test_a_written_config_loads_back_the_same(tmp_path):
    """config.yaml (what a run folder records and resume compares) loads back unchanged."""
    cfg = load_config(CONFIG, [*PATHS, "train.steps=7"])
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert load_config(saved) == cfg


def test_defaults_files_are_merged_under_the_config(tmp_path, monkeypatch):
    """``defaults:`` lists base files (relative to the including file): each merged in order,
    then the file's own keys; a section merges key by key, a key's value replaces the base's
    whole; overrides come last; a base's relative paths are its folder's."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.jsonl").write_text("")
    (tmp_path / "sub" / "model.yaml").write_text(
        "model: {encoder: {tiny: {}}, llm: {tiny: {}}, adapter: {stride: 4}}\n")
    (tmp_path / "sub" / "base.yaml").write_text(
        "defaults: [model.yaml]\n"
        "data: {train_manifest: m.jsonl, behaviors: beh, spec_augment: {freq_masks: 1, time_masks: 3}}\n"
        "train: {steps: 7, lr: 0.01, report_to: [tensorboard, wandb]}\n")
    (tmp_path / "second.yaml").write_text("train: {lr: 0.02, seed: 5}\n")
    run = tmp_path / "run.yaml"
    run.write_text("defaults: [sub/base.yaml, second.yaml]\n"
                   "data: {spec_augment: {time_masks: 2}}\ntrain: {steps: 3, report_to: []}\noutput_dir: out\n")
    monkeypatch.chdir(ROOT)  # not the configs' folder
    cfg = load_config(run, ["train.seed=9"])
    assert cfg["model"]["adapter"] == {"stride": 4} and cfg["model"]["llm"] == {"tiny": {}}
    assert cfg["train"]["steps"] == 3 and cfg["train"]["lr"] == 0.02 and cfg["train"]["seed"] == 9
    assert cfg["train"]["report_to"] == [] and cfg["train"]["warmup_steps"] == 50
    assert cfg["data"]["spec_augment"] == {"time_masks": 2}
    assert cfg["data"]["train_manifest"] == str(tmp_path / "sub" / "m.jsonl")
    assert "defaults" not in cfg
    assert model_section(run) == cfg["model"]


@pytest.mark.parametrize("text, message", [
    ("defaults: [nope.yaml]\n", r"run.yaml: defaults: .*nope.yaml not found"),
    ("defaults: [run.yaml]\n", r"run.yaml: defaults: run.yaml includes itself \(.*run.yaml -> .*run.yaml\)"),
    ("defaults: [a.yaml]\n", r"a.yaml: defaults: run.yaml includes itself \(.*run.yaml -> .*a.yaml -> .*run.yaml\)"),
    ("defaults: 5\n", r"run.yaml: defaults must be a list of config files \(e.g. defaults: \[demo.yaml\]\), got 5"),
    ("defaults: [bad.yaml]\n", r"bad.yaml: not a valid config: .* at line \d+, column \d+"),
])
def test_defaults_errors_name_the_file(tmp_path, text, message):
    (tmp_path / "a.yaml").write_text("defaults: [run.yaml]\n")
    (tmp_path / "bad.yaml").write_text("train: [\n")
    (tmp_path / "run.yaml").write_text(text + "output_dir: out\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_config(tmp_path / "run.yaml")


def _documented_keys() -> set[str]:
    """The keys the table of docs/training.md#the-config names (``a.b/c``: a.b and a.c)."""
    text = (ROOT / "docs" / "training.md").read_text().split("## The config", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            for token in re.findall(r"`([\w./]+)`", line.split("|")[1]):
                section, _, rest = token.partition(".")
                keys.update(f"{section}.{k}" for k in rest.split("/"))
    return keys


def test_every_section_key_is_documented():
    documented = _documented_keys()
    missing = [f"{name}.{f.name}" for name, section in SECTIONS.items()
               for f in dataclasses.fields(section) if f"{name}.{f.name}" not in documented]
    assert missing == []


@pytest.mark.parametrize("name", ["tiny_train", "demo_train", "demo_tiny_train"])
def test_shipped_run_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [*PATHS, "data.train_shards=null", "data.reader=memory"])
    RunConfig.from_dict(cfg)


def test_print_config_shows_the_merged_checked_config(capsys):
    """`mtbi-fast train CONFIG --print-config` prints what load_config returns, builds nothing."""
    from mtbi_fast.cli import main as cli

    config = ROOT / "configs" / "demo_tiny_train.yaml"
    assert cli(["train", str(config), "--print-config", *PATHS, "train.steps=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(config, [*PATHS, "train.steps=4"])
    assert printed["train"]["steps"] == 4 and printed["train"]["lr"] == 0.003  # tiny_train.yaml's
    assert printed["model"]["llm"] == {"tiny": {"initializer_range": 0.3}}
    assert not (ROOT / "c").exists()  # output_dir: nothing written
