"""``deepspeed: auto`` (mtbi_fast.sharding): sizes counted on the meta device against models really
built, and against hand-counted real shapes; the ZeRO-2 / ZeRO-3 boundary at hand-computed sizes;
the JSON it returns is the repo's."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtbi_fast import hub, sharding
from mtbi_fast.encoders import TINY_ENCODER, load_encoder
from mtbi_fast.model import Adapter, ModelConfig, SpeechLLM

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GB = 10 ** 9


def _model_section(name: str, **changes) -> dict:
    return {**yaml.safe_load((CONFIGS / name).read_text())["model"], **changes}


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ---- sizes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config,llm", [
    ("tiny.yaml", None),
    ("tiny_train.yaml", None),  # llm: {tiny: {initializer_range: 0.3}}
    ("tiny.yaml", {"tiny": {"tie_word_embeddings": True}}),  # the tied table counts once
    ("tiny.yaml", {"tiny": {"model_type": "qwen2", "num_hidden_layers": 3}}),  # q/k/v biases
])
def test_frozen_bytes_equal_the_built_models(config, llm, dtype):
    model = _model_section(config, **({"llm": llm} if llm else {}))
    built_llm, _ = hub.load_llm(model["llm"])
    built_encoder = load_encoder(model["encoder"])
    built_llm.to(dtype), built_encoder.to(dtype)
    frozen, n_llm = sharding.frozen_model_bytes(model, dtype)
    assert frozen == _param_bytes(built_llm) + _param_bytes(built_encoder)
    assert n_llm == sum(p.numel() for p in built_llm.parameters())


@pytest.mark.parametrize("changes", [
    {},
    {"train_encoder_layers": 1},  # its top layer and final norm are trained, not frozen
    {"adapter": {"kind": "conv", "stride": 2, "hidden": 96}},
    {"lora": {"r": 4}},  # q_proj, v_proj by default
    {"lora": {"r": 2, "target_modules": ["k_proj", "down_proj"]}, "train_encoder_layers": 2},
    {"lora": {"r": 3, "target_modules": r".*\.(q|o)_proj"}},  # a regular expression, as peft reads it
    {"lora": {"r": 2, "target_modules": "all-linear"}},  # every linear layer but the head
])
def test_frozen_and_trained_parts_equal_the_speech_llm(changes):
    if "lora" in changes:
        pytest.importorskip("peft")
    model = _model_section("tiny.yaml", dtype="bfloat16", **changes)
    built = SpeechLLM.from_config(ModelConfig.from_dict(model))
    frozen = sum(p.numel() * p.element_size() for p in built.parameters() if not p.requires_grad)
    trained = sum(p.numel() for p in built.parameters() if p.requires_grad)
    assert sharding.frozen_model_bytes(model, torch.bfloat16)[0] == frozen
    assert sharding.trainable_params(model) == trained


def test_real_shapes_count_as_published():
    """Qwen2.5-7B, Llama-3-70B and the Whisper large-v3 encoder as `tiny` sources (meta device:
    nothing allocated), against parameter counts written out by hand from their shapes."""
    whisper = {"tiny": dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                            encoder_ffn_dim=5120, max_source_positions=1500)}
    qwen = {"tiny": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)}
    llama = {"tiny": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)}
    d, f = 1280, 5120  # conv1, conv2, positions, 32 x (q k v o + q v o biases, 2 norms, fc1, fc2), norm
    n_whisper = (128 * d * 3 + d + d * d * 3 + d + 1500 * d
                 + 32 * (4 * d * d + 3 * d + 4 * d + 2 * d * f + f + d) + 2 * d)
    h, i, kv, v = 3584, 18944, 512, 152064  # embed, head, 28 x (q+b, k+b, v+b, o, 3 mlp, 2 norms), norm
    n_qwen = 2 * v * h + 28 * (2 * h * h + h + 2 * (h * kv + kv) + 3 * h * i + 2 * h) + h
    h, i, kv, v = 8192, 28672, 1024, 128256
    n_llama = 2 * v * h + 80 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    assert (n_whisper, n_qwen, n_llama) == (636_968_960, 7_615_616_512, 70_553_706_496)

    full = _model_section("full_whisper_large_v3_qwen2_7b.yaml", encoder=whisper, llm=qwen)
    assert sharding.frozen_model_bytes(full, torch.bfloat16) == (2 * (n_whisper + n_qwen), n_qwen)
    assert sharding.frozen_model_bytes({**full, "llm": llama}, torch.bfloat16) == \
        (2 * (n_whisper + n_llama), n_llama)
    # the recipe's adapter: Linear(4 x 1280, 4096), Linear(4096, 3584)
    n_adapter = 4 * 1280 * 4096 + 4096 + 4096 * 3584 + 3584
    assert sharding.trainable_params(full) == n_adapter == 35_659_264
    with torch.device("meta"):
        assert sum(p.numel() for p in Adapter(1280, 3584, stride=4, hidden=4096).parameters()) == n_adapter


def test_path_and_name_sources_read_only_the_config(tmp_path, monkeypatch):
    import transformers

    tiny = _model_section("tiny.yaml")
    spec = {k: v for k, v in hub.TINY_LLM.items() if k != "model_type"}
    # config.json files and no weights
    transformers.AutoConfig.for_model("llama", **spec).save_pretrained(tmp_path / "llm")
    transformers.WhisperConfig(**TINY_ENCODER).save_pretrained(tmp_path / "cache" / "models" / "enc")
    monkeypatch.setenv("MTBI_FAST_CACHE", str(tmp_path / "cache"))
    sources = {"llm": {"path": str(tmp_path / "llm")}, "encoder": {"name": "enc"}}
    assert sharding.frozen_model_bytes({**tiny, **sources}, torch.float32) == \
        sharding.frozen_model_bytes(tiny, torch.float32)


def test_an_unreadable_source_is_named(tmp_path, monkeypatch):
    import transformers

    tiny = _model_section("tiny.yaml")
    with pytest.raises(ValueError, match=r"model\.llm"):
        sharding.frozen_model_bytes({**tiny, "llm": {"path": str(tmp_path / "absent")}}, torch.float32)
    with pytest.raises(ValueError, match=r"model\.encoder"):
        sharding.frozen_model_bytes({**tiny, "encoder": {"name": "never-fetched"}}, torch.float32)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ValueError, match=r"model\.llm.*Qwen/Qwen2\.5-7B-Instruct.*couldn't connect"):
        sharding.frozen_model_bytes({**tiny, "llm": {"hub": "Qwen/Qwen2.5-7B-Instruct"}}, torch.bfloat16)


# ---- the decision -----------------------------------------------------------------------------

# Whisper large-v3 encoder (~635 M) + Qwen2.5-7B (7.6 B), bf16, and the recipe's 35.66 M adapter
FROZEN_7B = (7_600_000_000 + 635_000_000) * 2  # 16.47 GB
ADAPTER = 35_659_264
FROZEN_70B = (70_553_706_496 + 635_000_000) * 2  # 142.4 GB


def test_a_7b_llm_is_replicated_at_80_and_141_gb():
    for free in (80 * GB, 141 * GB):
        reserve = sharding.default_reserve(free)
        assert reserve == free // 4  # above the 4 GiB floor
        stage, why = sharding.choose_zero_stage(FROZEN_7B, ADAPTER, free, 8, reserve, dtype=torch.bfloat16)
        assert stage == 2, why
    # 141 GB (131.3 GiB): 16.47e9 + 35,659,264 x (4 + 12 / 8) + 35.25e9 = 51.9e9 bytes needed
    assert why.startswith("ZeRO-2: the frozen weights (15.3 GiB, bf16) fit on each GPU (131.3 GiB free, "
                          "32.8 GiB kept for activations, 187.0 MiB for the states of 35.7 M trained")
    assert why.endswith("replicated, no per-layer gathers")


def test_the_boundary_at_hand_computed_sizes():
    reserve = 24 * 2 ** 30  # 25,769,803,776
    # trained parts at 8 ranks: 35,659,264 x 4 (fp32 weights) + 35,659,264 x 12 / 8 = 196,125,952
    need = 16_470_000_000 + 196_125_952 + 25_769_803_776
    assert need == 42_435_929_728
    assert sharding.choose_zero_stage(FROZEN_7B, ADAPTER, need, 8, reserve)[0] == 2
    stage, why = sharding.choose_zero_stage(FROZEN_7B, ADAPTER, need - 1, 8, reserve)
    assert stage == 3 and "do not fit on each GPU" in why and "partitioned over 8 GPUs (1.9 GiB each)" in why
    # one rank keeps all 16 bytes of each trained parameter: 35,659,264 x 16 = 570,548,224
    one = 16_470_000_000 + 570_548_224 + reserve
    assert sharding.choose_zero_stage(FROZEN_7B, ADAPTER, one, 1, reserve)[0] == 2
    stage, why = sharding.choose_zero_stage(FROZEN_7B, ADAPTER, one - 1, 1, reserve)
    assert stage == 3 and "on one GPU ZeRO-3 partitions nothing" in why and "on the GPU" in why


def test_a_70b_llm_is_partitioned_at_141_gb():
    free = 141 * GB
    stage, why = sharding.choose_zero_stage(FROZEN_70B, ADAPTER, free, 8, sharding.default_reserve(free),
                                            dtype=torch.bfloat16)
    assert stage == 3
    # 142.4e9 bytes = 132.6 GiB, / 8 = 16.6 GiB a rank
    assert why.startswith("ZeRO-3: the frozen weights (132.6 GiB, bf16) do not fit on each GPU "
                          "(131.3 GiB free")
    assert why.endswith("partitioned over 8 GPUs (16.6 GiB each), gathered layer by layer")
    # on 2 H100s a half (71.2e9) + 20e9 kept + the adapter's states does not fit 80 GB either
    stage, why = sharding.choose_zero_stage(FROZEN_70B, ADAPTER, 80 * GB, 2,
                                            sharding.default_reserve(80 * GB))
    assert stage == 3 and "even partitioned over 2 GPUs" in why and "expect out-of-memory" in why


def test_the_default_reserve():
    assert sharding.default_reserve(8 * 2 ** 30) == 4 * 2 ** 30  # the floor on a GPU
    assert sharding.default_reserve(140 * 2 ** 30) == 35 * 2 ** 30
    assert sharding.default_reserve(8 * 2 ** 30, "cpu") == 2 * 2 ** 30  # no floor on a CPU


# ---- the config -------------------------------------------------------------------------------

def test_auto_on_cpu_replicates_the_tiny_model():
    model = _model_section("tiny.yaml", dtype="bfloat16")
    ds, why = sharding.auto_deepspeed_config(model, world=1, device=torch.device("cpu"))
    assert ds == json.loads((CONFIGS / "ds_zero2.json").read_text())
    frozen = sum(_param_bytes(m) for m in (hub.load_llm(model["llm"])[0].bfloat16(),
                                          load_encoder(model["encoder"]).bfloat16()))
    assert frozen == 660_608
    assert why.startswith("ZeRO-2: the frozen weights (645.1 KiB, bf16) fit in RAM (")
    assert "GiB free" in why and "20,608 trained parameters" in why


def test_auto_with_too_little_memory_partitions():
    model = _model_section("tiny.yaml")
    ds, why = sharding.auto_deepspeed_config(model, world=2, device="cpu", free_bytes=1_000_000,
                                             reserve_bytes=0)
    assert ds == json.loads((CONFIGS / "ds_zero3.json").read_text())
    # float32: 1,321,216 bytes frozen do not fit in 1,000,000; trained: 20,608 x (4 + 12 / 2) bytes
    assert why.startswith("ZeRO-3: the frozen weights (1.3 MiB, fp32) do not fit in each rank's share of RAM "
                          "(976.6 KiB free, 0 B kept for activations, 201.2 KiB for the states of 20,608")
    assert why.endswith("partitioned over 2 ranks (645.1 KiB each), gathered layer by layer")
    ds["zero_optimization"]["stage"] = 99  # the trainer completes the dict in place
    assert sharding.auto_deepspeed_config(model, world=2, device="cpu", free_bytes=1_000_000,
                                          reserve_bytes=0)[0]["zero_optimization"]["stage"] == 3


def test_free_memory_on_a_cpu(monkeypatch):
    import psutil

    class Memory:
        available = 10_000_000_001

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # the ranks of a node share its RAM
    assert sharding.free_memory(torch.device("cpu")) == 2_500_000_000
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed: os.sysconf
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0.5 * pages < sharding.free_memory("cpu") < 2 * pages


def test_the_in_code_copies_equal_the_files(tmp_path, monkeypatch):
    for stage, builtin in ((2, sharding.ZERO2), (3, sharding.ZERO3)):
        assert builtin == json.loads((CONFIGS / f"ds_zero{stage}.json").read_text())
        assert builtin["zero_optimization"]["stage"] == stage
    monkeypatch.setattr(sharding, "CONFIGS", tmp_path)  # an installed package without configs/
    ds = sharding.deepspeed_template(3)
    assert ds == sharding.ZERO3
    ds["zero_optimization"]["stage"] = 0
    assert sharding.ZERO3["zero_optimization"]["stage"] == 3  # a copy
