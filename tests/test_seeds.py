from smolthink.seeds import SEED_BITS, derive_seed


def test_derive_seed_is_pure_and_separates_streams():
    assert derive_seed(0, "rollout", 3) == derive_seed(0, "rollout", 3)
    seeds = {derive_seed(b, name, i) for b in range(3) for name in ("rollout", "plan", "eval") for i in range(50)}
    assert len(seeds) == 3 * 3 * 50  # no two streams or steps collide
    assert all(0 <= s < 2**SEED_BITS for s in seeds)
    assert derive_seed(0, "eval", 1) != derive_seed(1, "eval", 0)  # not a sum of its parts
