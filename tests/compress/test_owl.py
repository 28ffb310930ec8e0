"""OWL schedules: mean kept, outlier-heavy blocks pruned less, and the schedule honoured per block."""

from __future__ import annotations

import pytest
from sparsedial.compress.calibration import CalibrationConfig
from sparsedial.compress.epts import EPTSConfig
from sparsedial.compress.export import load_elastic_for_eval, tier_weights
from sparsedial.compress.owl import owl_schedule
from sparsedial.compress.pipeline import compress_epts
from sparsedial.engine.elastic_format import active_lora_groups, groups_for_sparsity, keep_count


def test_schedule_keeps_the_mean_and_orders_blocks():
    sched = owl_schedule([0.010, 0.002, 0.006, 0.004], 0.7, lam=0.08)
    assert sched[1] == max(sched) and sched[0] == min(sched)  # most outliers -> least sparsity
    assert max(sched) - min(sched) == 16
    assert abs(sum(sched) / len(sched) - 70) <= 1
    assert owl_schedule([0.01, 0.01], 0.5) == (50, 50)
    with pytest.raises(ValueError, match="lambda"):
        owl_schedule([0.1, 0.2], 0.5, lam=0.7)


def test_owl_checkpoint_prunes_each_block_at_its_own_sparsity(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "owl"
    compress_epts(tiny_model_dir, out, ["dense", "70%", "2:4"], CalibrationConfig(str(calib_file), 4, 32),
                  EPTSConfig(epochs=1, batch_size=2), owl_lambda=0.1, progress=False)
    lm, spec, tensors = load_elastic_for_eval(out)
    tier = spec.tier("70%")
    assert tier.schedule is not None and len(tier.schedule) == 2 and spec.tier("2:4").schedule is None
    with tier_weights(lm.model, spec, tensors, tier) as model:
        for i, layer in enumerate(model.model.layers):
            w = layer.mlp.up_proj.weight
            assert ((w != 0).sum(1) == keep_count(w.shape[1], tier.schedule[i] / 100)).all()
    # LoRA groups follow each block's own sparsity, not the tier's nominal 70%
    per_block = [active_lora_groups(spec, tier, {}, f"model.layers.{i}.mlp.up_proj", i) for i in range(2)]
    assert per_block == [list(groups_for_sparsity(spec.groups, p / 100)) for p in tier.schedule]
    assert per_block[0] != per_block[1]
