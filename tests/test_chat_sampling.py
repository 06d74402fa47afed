"""Sampling processors and streamed stop strings."""

from __future__ import annotations

import pytest
import torch

from lavin_edge.chat.sampling import GenerationConfig, Sampler, StopStringStream


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
