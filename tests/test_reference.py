"""The eager reference against a peer formulation (torch.nn.functional.kl_div / cross_entropy)."""

import torch
import torch.nn.functional as F
from helpers import make_inputs

from mtbi_fast.reference import eager_row_losses


def test_eager_matches_kl_div_and_cross_entropy():
    x = make_inputs(bias=True, ignore=(2, 5))
    T, ce_w, kl_w = 1.5, 0.4, 0.8
    rows = eager_row_losses(x["student_hidden"], x["teacher_hidden"], x["lm_head_weight"],
                            x["lm_head_weight"], x["lm_head_bias"], x["lm_head_bias"],
                            x["target_ids"], temperature=T, kl_weight=kl_w, ce_weight=ce_w)
    z_s = x["student_hidden"] @ x["lm_head_weight"].T + x["lm_head_bias"]
    z_t = x["teacher_hidden"] @ x["lm_head_weight"].T + x["lm_head_bias"]
    kl = F.kl_div(F.log_softmax(z_s / T, -1), F.log_softmax(z_t / T, -1), log_target=True,
                  reduction="none").sum(-1)
    ce = F.cross_entropy(z_s, x["target_ids"], reduction="none", ignore_index=-100)
    expected = (kl_w * T * T * kl + ce_w * ce) * (x["target_ids"] != -100)
    torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-12)
    assert rows[2] == 0 and rows[5] == 0
