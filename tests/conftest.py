"""Test setup. TRITON_INTERPRET must be set before triton is first imported, so it is set here.

With it, the Triton kernels run on the CPU interpreter (slow: tests use small shapes).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_inputs(n=37, h=40, v=203, h_t=None, dtype=torch.float64, bias=False, ignore=(), scale=0.3,
                seed=0, lead=None):
    """Random loss inputs. ``h_t`` set: a separate teacher head of that width. ``ignore``: rows
    whose target is -100. ``lead``: reshape the rows to this leading shape (e.g. (B, T))."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * scale
    out = dict(student_hidden=hs, lm_head_weight=w)
    if h_t is None:
        # the teacher is a perturbed student, as in MTBI (same head)
        out["teacher_hidden"] = hs + 0.7 * torch.randn(n, h, generator=g, dtype=torch.float64)
    else:
        out["teacher_hidden"] = torch.randn(n, h_t, generator=g, dtype=torch.float64)
        out["teacher_lm_head_weight"] = torch.randn(v, h_t, generator=g, dtype=torch.float64) * scale
    if bias:
        out["lm_head_bias"] = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    target = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        target[i] = -100
    out["target_ids"] = target
    out = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in out.items()}
    if lead is not None:
        for k in ("student_hidden", "teacher_hidden"):
            out[k] = out[k].reshape(*lead, -1)
        out["target_ids"] = out["target_ids"].reshape(lead)
    return out
