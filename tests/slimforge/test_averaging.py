import pytest
import torch

from slimforge.averaging import average_states


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=g), "b": torch.randn(5, generator=g),
            "steps": torch.tensor(seed, dtype=torch.long)}


def test_the_average_of_copies_is_the_model_bit_for_bit():
    state = _state(0)
    soup = average_states([{k: v.clone() for k, v in state.items()} for _ in range(7)])
    assert soup.keys() == state.keys()
    assert all(torch.equal(soup[k], state[k]) for k in state)  # bit-exact, not only close
    one = average_states([state])
    assert all(torch.equal(one[k], state[k]) for k in state)


def test_float_entries_are_the_mean_and_the_rest_comes_from_the_first():
    states = [_state(s) for s in (1, 2, 3)]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    soup = average_states(states)
    for name in ("w", "b"):
        mean = torch.stack([s[name] for s in states]).mean(0)
        torch.testing.assert_close(soup[name], mean, rtol=0, atol=1e-6)
    assert soup["steps"] == 1 and soup["steps"].dtype == torch.long
    assert all(torch.equal(s[k], b[k]) for s, b in zip(states, before) for k in s)  # inputs untouched


def test_mismatched_states_are_refused_naming_the_tensor():
    a, b = _state(0), _state(1)
    with pytest.raises(ValueError, match="no state dicts"):
        average_states([])
    with pytest.raises(ValueError, match="state 1 lacks tensor 'b'"):
        average_states([a, {k: v for k, v in b.items() if k != "b"}])
    with pytest.raises(ValueError, match="state 1 has an extra tensor 'x'"):
        average_states([a, b | {"x": torch.zeros(1)}])
    with pytest.raises(ValueError, match=r"tensor 'w' of state 1 is \(3, 5\)"):
        average_states([a, b | {"w": torch.zeros(3, 5)}])
