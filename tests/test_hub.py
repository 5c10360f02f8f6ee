"""Model sources (mtbi_fast/hub.py): a converted model not fetched yet is a clear error; hub sources
pinned (``{hub: ID, revision: ...}``) are loaded from the Hugging Face cache at the commit the revision resolves to, which runs (``run.json``) and behaviors
(``plan.json``) record; a branch that moved upstream is refused on resume. The hub is a fake offline
cache here (``models--org--name/snapshots/<sha>`` and ``refs/<branch>``)."""

import json

import pytest
import torch
import transformers

import mtbi_fast.hub as hub
from mtbi_fast.behaviors import BehaviorConfig, generate_behaviors
from mtbi_fast.provenance import check_teacher, read_plan
from mtbi_fast.cli import main as cli
from mtbi_fast.data import read_manifest, write_manifest
from mtbi_fast.model import ModelConfig
from mtbi_fast.tasks import TaskLibrary

from helpers import CONFIG, ROOT

SHA1, SHA2 = "1" * 40, "2" * 40
LLM = {"hub": "org/tiny", "revision": "main"}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """An offline hub cache with org/tiny at two commits (other weights); main -> SHA1."""
    import huggingface_hub.constants as constants

    root = tmp_path / "hf-cache"
    repo = root / "models--org--tiny"
    for seed, sha in ((0, SHA1), (1, SHA2)):
        torch.manual_seed(seed)
        llm = transformers.AutoModelForCausalLM.from_config(hub.tiny_llm_config({"initializer_range": 0.3}))
        llm.save_pretrained(repo / "snapshots" / sha)
        hub.tiny_tokenizer().save_pretrained(repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA1)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_SNAPSHOTS", {})

    def move_main(sha):
        (repo / "refs" / "main").write_text(sha)
        hub._SNAPSHOTS.clear()  # what a new process sees

    return move_main


def test_a_revision_loads_its_commit_and_bad_sources_are_named(fake_hub):
    a, _ = hub.load_llm({"hub": "org/tiny", "revision": SHA1})
    b, _ = hub.load_llm({"hub": "org/tiny", "revision": SHA2})
    main, _ = hub.load_llm({"hub": "org/tiny"})
    w = lambda m: m.get_input_embeddings().weight  # noqa: E731
    assert torch.equal(w(main), w(a)) and not torch.equal(w(a), w(b))
    assert hub.hub_commit({"hub": "org/tiny", "revision": "main"}) == f"hub:org/tiny@{SHA1}"
    with pytest.raises(ValueError, match=r"hub model org/tiny at v9: cannot resolve it"):
        hub.load_llm({"hub": "org/tiny", "revision": "v9"})
    with pytest.raises(ValueError, match=r"model.llm.revision pins a hub model; a path source has none"):
        ModelConfig.from_dict({"llm": {"path": "/x", "revision": "main"}})
    with pytest.raises(ValueError, match=r"model.llm must be one of .*hub: ..., revision: ..."):
        ModelConfig.from_dict({"llm": {"hub": "org/tiny", "path": "/x"}})
    with pytest.raises(ValueError, match=r"model.llm.revision must be a commit, branch or tag name"):
        ModelConfig.from_dict({"llm": {"hub": "org/tiny", "revision": 3}})


def test_runs_and_behaviors_record_the_commit_and_refuse_a_moved_branch(fake_hub, tmp_path, capsys):
    train = read_manifest(ROOT / "data" / "demo" / "train.jsonl")[:4]
    write_manifest(tmp_path / "train.jsonl", train)
    model_cfg = {"encoder": {"tiny": {}}, "llm": LLM}
    llm, tok = hub.load_llm(LLM)
    generate_behaviors(train, TaskLibrary.load(ROOT / "configs" / "tasks.yaml"), llm, tok, tmp_path / "beh",
                       BehaviorConfig(per_utterance=1, max_new_tokens=6, cache_hidden=True), progress=False,
                       model_config=model_cfg)
    teacher = read_plan(tmp_path / "beh")["teacher"]
    assert teacher["commit"] == SHA1 and teacher["source"] == LLM

    out = tmp_path / "run"
    args = ["train", str(CONFIG), f"data.train_manifest={tmp_path}/train.jsonl", f"data.behaviors={tmp_path}/beh",
            "data.eval_manifest=null", "data.eval_behaviors=null", "train.eval_every=0",
            "model.llm={hub: org/tiny, revision: main}", f"output_dir={out}", "train.save_every=2"]
    assert cli([*args, "train.steps=2"]) == 0
    assert json.loads((out / "run.json").read_text())["data"]["model.llm"] == f"hub:org/tiny@{SHA1}"
    # the same commit named another way resumes
    assert cli([*args[:-4], f"model.llm={{hub: org/tiny, revision: '{SHA1}'}}", *args[-2:], "train.steps=3"]) == 0

    fake_hub(SHA2)  # main moved upstream
    capsys.readouterr()
    assert cli([*args, "train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert f"model.llm (hub:org/tiny@{SHA1} -> hub:org/tiny@{SHA2})" in err, err
    with pytest.raises(ValueError, match=f"teacher.commit \\(recorded '{SHA1}', now '{SHA2}'\\)"):
        check_teacher(tmp_path / "beh", model_cfg)


@pytest.mark.parametrize("kind, name", [("llm", "smollm2-135m-instruct"), ("encoder", "whisper-tiny.en")])
def test_a_converted_model_not_fetched_names_the_command(tmp_path, monkeypatch, kind, name):
    from mtbi_fast.encoders import load_encoder

    load = hub.load_llm if kind == "llm" else load_encoder
    monkeypatch.setenv("MTBI_FAST_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"run `mtbi-fast models fetch {name}` first"):
        load({"name": name})
