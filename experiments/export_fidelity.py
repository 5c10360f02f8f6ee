"""How closely an exported folder reproduces its run: the logits of one prompt about one clip from
``mtbi-fast export``'s float32 and bf16 folders, loaded with transformers, against mtbi-fast's own
(the run's model in float32, and as it trained: frozen weights in ``model.dtype``).

    python experiments/export_fidelity.py runs/demo/run --audio data/demo/audio/demo-test-025.flac

Prints, per export dtype, the largest logit difference (absolute and over the logits' standard
deviation), the mean one, and the share of positions whose argmax agrees.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def mtbi_logits(model, wave, prompt: str) -> torch.Tensor:
    from mtbi_fast.prompts import prompt_halves

    frames = model.speech_frames([model.features(wave)])[0]
    before, after = prompt_halves(model.tokenizer, prompt)
    embed = model.llm.get_input_embeddings()
    with torch.no_grad():
        x = torch.cat([embed(torch.tensor(before)), frames.to(embed.weight.dtype), embed(torch.tensor(after))])
        return model.llm(inputs_embeds=x[None]).logits[0].float()


def main(argv=None) -> int:
    from transformers import AutoFeatureExtractor, AutoModel, AutoTokenizer

    from mtbi_fast.audio import load_audio
    from mtbi_fast.export import export, model_folder
    from mtbi_fast.model import SpeechLLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--audio", required=True)
    ap.add_argument("--prompt", default="Summarize in one sentence: {speech}")
    args = ap.parse_args(argv)
    wave = load_audio(args.audio)
    trained = SpeechLLM.from_pretrained(model_folder(args.run)).eval()
    refs = {"as trained": mtbi_logits(trained, wave, args.prompt),
            "float32": mtbi_logits(SpeechLLM.from_pretrained(model_folder(args.run)).eval().float(), wave, args.prompt)}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            folder = export(args.run, Path(tmp) / dtype, dtype=dtype)
            model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
            features = AutoFeatureExtractor.from_pretrained(folder)
            inputs = model.prepare_inputs(tok, features, [wave.numpy()], [args.prompt])
            with torch.no_grad():
                got = model(**inputs).logits[0].float()
            for name, want in refs.items():
                d = (got - want).abs()
                print(f"{dtype} export vs the run {name}: max {float(d.max()):.3g} ({float(d.max() / want.std()):.2g} "
                      f"of the std), mean {float(d.mean() / want.std()):.2g} of the std, argmax agreement "
                      f"{float(got.argmax(-1).eq(want.argmax(-1)).float().mean()):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
