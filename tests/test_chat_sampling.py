"""Sampling processors and streamed stop strings."""

from __future__ import annotations

import pytest
import torch

from lavin_edge.runtime.sampling import GenerationConfig, Sampler, StopStringStream


def test_greedy_is_argmax() -> None:
    s = Sampler(GenerationConfig(), 5)
    assert s(torch.tensor([0.1, 3.0, 2.0, -1.0, 0.0])) == 1


def test_top_k_and_top_p_filter() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    x = Sampler(GenerationConfig(temperature=1.0, top_k=2), 5).process(logits)
    assert torch.isfinite(x).tolist() == [True, True, False, False, False]
    # probs ~ [0.64, 0.24, 0.09, 0.03, 0.01]: top_p 0.8 keeps the first two (0.64 < 0.8 <= 0.88).
    x = Sampler(GenerationConfig(temperature=1.0, top_p=0.8), 5).process(logits)
    assert torch.isfinite(x).tolist() == [True, True, False, False, False]
    x = Sampler(GenerationConfig(temperature=1.0, top_p=0.5), 5).process(logits)
    assert torch.isfinite(x).tolist() == [True, False, False, False, False]  # the top token always stays


def test_temperature_scales() -> None:
    logits = torch.tensor([2.0, 1.0])
    x = Sampler(GenerationConfig(temperature=0.5), 2).process(logits)
    assert torch.allclose(x, torch.tensor([4.0, 2.0]))


def test_repetition_penalty_ctrl_rule() -> None:
    s = Sampler(GenerationConfig(repetition_penalty=2.0), 4)
    s.observe([0, 1])
    x = s.process(torch.tensor([2.0, -2.0, 1.0, 1.0]))
    assert x.tolist() == [1.0, -4.0, 1.0, 1.0]
    assert s(torch.tensor([2.0, -2.0, 1.5, 1.0])) == 2  # token 0 (1.0 after penalty) loses to 1.5


def test_seed_reproducible() -> None:
    logits = torch.zeros(1000)
    a = [Sampler(GenerationConfig(temperature=1.0, seed=3), 1000)(logits) for _ in range(3)]
    b = [Sampler(GenerationConfig(temperature=1.0, seed=3), 1000)(logits) for _ in range(3)]
    assert a == b
    s = Sampler(GenerationConfig(temperature=1.0, seed=3), 1000)
    assert len({s(logits) for _ in range(20)}) > 10  # draws within one run differ


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=0),
                                 dict(repetition_penalty=0)])
def test_invalid_settings(bad: dict) -> None:
    with pytest.raises(ValueError):
        GenerationConfig(**bad).validate()


def _bytes_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_stop_string_is_held_back_and_cut() -> None:
    st = StopStringStream(_bytes_decode, ("\nUser:",))
    out = "".join(st.push(b) for b in b"Hello\nUs")
    assert out == "Hello"  # "\nUs" could still become the stop string
    out += st.push(ord("e"))
    assert not st.stopped
    out += "".join(st.push(b) for b in b"r:")
    assert st.stopped and out + st.finish() == "Hello" and st.text == "Hello"


def test_false_alarm_is_released() -> None:
    st = StopStringStream(_bytes_decode, ("STOP",))
    out = "".join(st.push(b) for b in b"ST")
    assert out == ""
    out += "".join(st.push(b) for b in b"AR")
    assert out == "STAR"


def test_multibyte_character_waits_for_its_last_byte() -> None:
    st = StopStringStream(_bytes_decode)
    data = "é!".encode()
    assert st.push(data[0]) == ""
    assert st.push(data[1]) == "é"
    assert st.push(data[2]) == "!"


CONFIGS = [dict(temperature=0.8), dict(temperature=0.7, top_k=40), dict(temperature=1.0, top_p=0.9),
           dict(temperature=1.3, top_p=0.995), dict(temperature=0.9, top_k=300, top_p=0.8),
           dict(temperature=1.0, top_p=0.3, repetition_penalty=1.3)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_kept_tokens_are_what_process_keeps(cfg: dict) -> None:
    """The fast path's partial sorts keep exactly the tokens the whole-row definition leaves finite, with the
    same processed logits (a wide vocabulary with a long tail, so the nucleus search has to widen)."""
    g = torch.Generator().manual_seed(1)
    for trial in range(4):
        logits = torch.randn(5000, generator=g) * (1 + 3 * trial) - torch.arange(5000) * 1e-4
        s = Sampler(GenerationConfig(**cfg), 5000)
        s.observe(list(range(0, 5000, 7)))
        want = s.process(logits)
        ids, x = s.kept(logits)
        assert sorted(ids.tolist()) == torch.isfinite(want).nonzero()[:, 0].tolist()
        assert torch.equal(torch.from_numpy(x), want[torch.from_numpy(ids)])


def test_greedy_with_penalty_is_argmax_of_process() -> None:
    g = torch.Generator().manual_seed(2)
    s = Sampler(GenerationConfig(repetition_penalty=1.5), 1000)
    for _ in range(20):
        logits = torch.randn(1000, generator=g)
        want = int(s.process(logits).argmax())
        assert s(logits) == want  # observes the token, so the penalty moves between rounds


@pytest.mark.parametrize("cfg", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.8)], ids=["full", "top_p"])
def test_draws_follow_the_probabilities(cfg: dict) -> None:
    """40,000 seeded draws over 700 tokens (three blocks of the inverse CDF) against softmax(process(x)): the
    total variation is within 1.5x of what sampling noise alone gives on average (0.5 sum sqrt(2 p (1 - p) /
    (pi n)), the mean absolute error of each count); an index off by one or a draw from the wrong block gives
    several times that. Nothing outside the kept set is drawn."""
    n = 40_000
    logits = torch.randn(700, generator=torch.Generator().manual_seed(3)) * 2
    s = Sampler(GenerationConfig(seed=4, **cfg), 700)
    want = torch.softmax(s.process(logits).double(), -1)
    counts = torch.bincount(torch.tensor([s(logits) for _ in range(n)]), minlength=700).double()
    assert counts[want == 0].sum() == 0
    noise = 0.5 * (2 * want * (1 - want) / (torch.pi * n)).sqrt().sum()
    tv = 0.5 * (counts / n - want).abs().sum()
    assert tv < 1.5 * noise, (tv, noise)
