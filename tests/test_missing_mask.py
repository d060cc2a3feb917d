"""data.missing=mask with every objective: an objective either honours the presence flags (a
pair with an absent side contributes nothing to its loss) or is refused naming the objectives
that do. `cross` masks pairs; its loss equals a slow per-pair reference on the present rows."""

from dataclasses import replace
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from mmcl import config
from mmcl.config import OBJECTIVE_NAMES
from mmcl.data.schema import present_column
from mmcl.data.synth import make_arrays
from mmcl.objectives import OBJECTIVES, ObjectiveError, build_objective

SMALL = ["model.embed_dim=16", "model.encoder.hidden=16", "model.proj_hidden=16",
         "model.proj_dim=16", "model.fusion_heads=2", "objective.critic_hidden=16"]
SUPPORTING = ("cross", "siglip", "supcon", "tuple", "tuple_infonce")


def nullable(manifest, *names):
    return replace(manifest, modalities=[replace(m, nullable=m.name in names)
                                         for m in manifest.modalities])


def _cfg(name, *extra):
    sets = [f"objective.name={name}", "data.missing=mask", *SMALL, *extra]
    if not name.startswith("factorcl"):
        sets.remove("objective.critic_hidden=16")
    return config.load(None, sets)


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_mask_is_honoured_or_refused_naming_the_objectives_that_honour_it(name):
    preset = "factorcl" if name.startswith("factorcl") else "rus"
    manifest, _ = make_arrays(preset, 64, seed=0)
    manifest = nullable(manifest, manifest.modality_names[1])
    cfg = _cfg(name)
    if name in SUPPORTING:
        assert OBJECTIVES[name].supports_missing
        build_objective(cfg, manifest)
    else:
        with pytest.raises(ObjectiveError) as err:
            build_objective(cfg, manifest)
        message = str(err.value)
        assert "data.missing=mask" in message and name in message
        for ok in SUPPORTING:
            assert ok in message
    # Without a modality that can be absent, mask changes nothing and is never refused.
    build_objective(_cfg(name), nullable(manifest))


def test_fused_objectives_with_mask_need_a_fusion_that_treats_absence():
    manifest, _ = make_arrays("rus", 64, seed=0)
    with pytest.raises(ObjectiveError, match="model.fusion"):
        build_objective(_cfg("tuple_infonce", "model.fusion=concat"), nullable(manifest, "b"))
    build_objective(_cfg("cross", "model.fusion=concat"), nullable(manifest, "b"))


def _batch(arrays, present, rows=24):
    batch = {m: torch.as_tensor(arrays[m][:rows], dtype=torch.float32) for m in "abc"}
    for m, flags in present.items():
        batch[present_column(m)] = flags
        batch[m] = batch[m] * flags[:, None]        # absent values are stored as zeros
    return batch


def slow_cross(z1, z2, present, tau):
    """Mean over pairs (a, b) of the symmetric InfoNCE of a in z1 against b in z2 over only
    the rows where a and b are present, each row's term written out."""
    n = len(z1["a"])
    flag = {m: present.get(m, torch.ones(n, dtype=torch.bool)) for m in z1}

    def one_way(x, y, keep):
        return -sum(torch.log_softmax(torch.stack([x[i] @ y[j] / tau for j in keep]), 0)[k]
                    for k, i in enumerate(keep)) / len(keep)

    terms = []
    for a, b in combinations(sorted(z1), 2):
        keep = [i for i in range(n) if flag[a][i] and flag[b][i]]
        terms.append(0.5 * (one_way(z1[a], z2[b], keep) + one_way(z2[b], z1[a], keep)))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("views", [1, 2])
def test_cross_with_absent_modalities_equals_the_per_pair_reference(views):
    manifest, arrays = make_arrays("rus", 64, seed=0)
    manifest = nullable(manifest, "b", "c")
    torch.manual_seed(0)
    obj = build_objective(_cfg("cross", f"objective.views={views}"), manifest).eval()
    g = torch.Generator().manual_seed(1)
    present = {"b": torch.rand(24, generator=g) > 0.3, "c": torch.rand(24, generator=g) > 0.5}
    batch = _batch(arrays, present)
    second = {k: (v + 0.05 * torch.randn(v.shape, generator=g) if k in "abc" else v)
              for k, v in batch.items()}
    view_list = [batch] if views == 1 else [batch, second]
    loss = obj(view_list, batch).loss
    with torch.no_grad():
        z = [obj.project(v) for v in view_list]
    if views == 1:
        expected = slow_cross(z[0], z[0], present, obj.cfg.temperature)
    else:
        # two views: each direction pairs a of one view with b of the other, averaged
        expected = 0.5 * (slow_cross(z[0], z[1], present, obj.cfg.temperature)
                          + slow_cross(z[1], z[0], present, obj.cfg.temperature))
    torch.testing.assert_close(loss.detach(), torch.as_tensor(float(expected)),
                               rtol=1e-5, atol=1e-6)

    # An absent side contributes nothing: other values in the absent cells, the same loss,
    # and no gradient reaches them.
    moved_views = [{k: v.clone() for k, v in view.items()} for view in view_list]
    for view in moved_views:
        for m, flags in present.items():
            view[m][~flags] = 7.0
    moved = moved_views[0]
    for m in "bc":
        moved_views[0][m].requires_grad_(True)
    again = obj(moved_views, moved).loss
    torch.testing.assert_close(again, loss, rtol=1e-5, atol=1e-6)
    again.backward()
    for m, flags in present.items():
        assert moved_views[0][m].grad[~flags].abs().max() == 0


def test_masked_info_nce_equals_info_nce_on_the_valid_rows():
    from mmcl.objectives.functional import info_nce

    g = torch.Generator().manual_seed(3)
    a = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    b = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    valid = torch.rand(20, generator=g) > 0.4
    torch.testing.assert_close(info_nce(a, b, 0.2, valid=valid),
                               info_nce(a[valid], b[valid], 0.2))
    assert info_nce(a, b, 0.2, valid=torch.zeros(20, dtype=torch.bool)) == 0
