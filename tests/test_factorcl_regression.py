"""Issue 33, item 1: FactorCL's concat critics are 256 wide by default (docs/methods.md).

bffdeea made 64 the default. On two real-valued views of digits (216 + 240 features, 10
classes, 20 epochs; docs/fidelity.md, "FactorCL regression") the fused embedding's probe fell
from 0.839 to 0.752 with it; scoring all pairs instead of 32 sampled negatives did not bring it
back (0.754), a 256-wide critic did. The bench guards the figure (fidelity.digits2_case); this
guards the default, cheaply.
"""

from mmcl import config
from mmcl.data.synth import make_arrays
from mmcl.objectives import build_objective


def test_factorcl_critics_default_to_256_hidden_units():
    for name in ("factorcl_ssl", "factorcl_sup"):
        cfg = config.load(None, [f"objective.name={name}", "model.embed_dim=16"])
        assert cfg.objective.critic_hidden == 256
    manifest, _ = make_arrays("factorcl", 64, seed=0)
    obj = build_objective(config.load(None, ["objective.name=factorcl_ssl",
                                             "model.embed_dim=16"]), manifest)
    critics = [*obj.critics.values(), *obj.club_critics.values()]
    assert critics and all(c.net[0].out_features == 256 for c in critics)
