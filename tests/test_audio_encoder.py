"""The default audio encoder (kind `audio`): a log-mel front end and a small 2-D CNN. Its cost
(FLOPs counted by torch.utils.flop_counter: exact, independent of the machine's load), that it
still learns (tones of different frequencies in noise), and its interface (any length and
sample rate, the mask argument, autocast, absent = all-zero rows, nothing new in checkpoints)."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmcl.config import EncoderConfig
from mmcl.data.schema import ModalitySpec
from mmcl.models import build_encoder
from mmcl.models.encoders import AudioEncoder, LogMel, mel_filters

EMBED = 128


def audio_spec(samples=16000, rate=16000):
    return ModalitySpec("sound", (samples,), "audio", sample_rate=rate)


def test_default_audio_encoder_costs_under_60_mflop_per_second_of_16khz_audio():
    # Issue 35 item 6: the former strided 1-D conv over the raw waveform cost 173 MFLOP per
    # sample forward at 16,000 samples (3.4 s forward+backward per batch of 64 on one thread).
    encoder = build_encoder(audio_spec(), EncoderConfig(), EMBED)
    assert isinstance(encoder, AudioEncoder)
    x = torch.randn(4, 16000)
    with FlopCounterMode(display=False) as forward:
        out = encoder(x)
    assert out.shape == (4, EMBED)
    assert forward.get_total_flops() / 4 < 60e6
    with FlopCounterMode(display=False) as step:
        encoder(x).sum().backward()
    assert step.get_total_flops() / 4 < 180e6


def _tones(n, classes, rate, samples, gen):
    """Class k: a sine at the k-th of `classes` log-spaced frequencies (200 Hz to rate/3, +-3%),
    random phase and amplitude 0.3-1, in Gaussian noise of std 0.5."""
    freqs = torch.logspace(math.log10(200), math.log10(rate / 3), classes)
    y = torch.randint(0, classes, (n,), generator=gen)
    f = freqs[y] * (1 + 0.06 * (torch.rand(n, generator=gen) - 0.5))
    t = torch.arange(samples) / rate
    phase = 2 * math.pi * torch.rand(n, 1, generator=gen)
    amp = 0.3 + 0.7 * torch.rand(n, 1, generator=gen)
    x = amp * torch.sin(2 * math.pi * f[:, None] * t + phase)
    return x + 0.5 * torch.randn(n, samples, generator=gen), y


def test_audio_encoder_learns_tone_frequencies_in_noise():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    classes, rate, samples = 8, 8000, 2000
    encoder = build_encoder(audio_spec(samples, rate), EncoderConfig(hidden=32), 16)
    head = torch.nn.Linear(16, classes)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    x_test, y_test = _tones(256, classes, rate, samples, gen)
    losses = []
    for _ in range(40):
        x, y = _tones(64, classes, rate, samples, gen)
        loss = torch.nn.functional.cross_entropy(head(encoder(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (head(encoder(x_test)).argmax(1) == y_test).float().mean().item()
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert accuracy > 0.6, accuracy  # chance: 1/8


def test_mel_filters_peak_at_increasing_frequencies_and_cover_every_band():
    filters = mel_filters(16000, 512, 64)
    assert filters.shape == (64, 257)
    assert (filters.max(dim=1).values > 0.5).all()  # no empty band
    peaks = filters.argmax(dim=1)
    assert (peaks[1:] >= peaks[:-1]).all() and peaks[-1] > 200
    # A 1 kHz tone's loudest band is the one whose filter peaks nearest 1 kHz.
    melspec = LogMel(16000)
    tone = torch.sin(2 * math.pi * 1000 * torch.arange(16000) / 16000)[None]
    loudest = melspec(tone).mean(dim=-1).argmax(dim=1).item()
    assert abs(peaks[loudest].item() * 16000 / 512 - 1000) < 100


@pytest.mark.parametrize("samples,rate", [(16000, 16000), (400, 4000), (1, 16000),
                                          (2000, None)])
def test_audio_encoder_takes_any_length_and_rate_and_ignores_the_mask(samples, rate):
    encoder = build_encoder(audio_spec(samples, rate or 16000) if rate else
                            ModalitySpec("sound", (samples,), "audio"),
                            EncoderConfig(hidden=16, layers=3), 8)
    x = torch.randn(3, samples)
    out = encoder(x)
    assert out.shape == (3, 8) and torch.isfinite(out).all()
    assert torch.equal(encoder(x, mask=torch.ones(3, samples, dtype=torch.bool)), out)


def test_absent_audio_rows_are_finite_and_gradients_reach_every_parameter():
    encoder = build_encoder(audio_spec(4000, 8000), EncoderConfig(hidden=16), 8)
    x = torch.randn(4, 4000)
    x[1] = 0.0  # an absent value of a nullable modality is stored as zeros
    out = encoder(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_audio_encoder_under_bf16_autocast_and_its_state_dict_holds_only_parameters():
    encoder = build_encoder(audio_spec(4000, 8000), EncoderConfig(hidden=16), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(torch.randn(2, 4000))
    assert out.shape == (2, 8) and torch.isfinite(out.float()).all()
    # The window and filter bank derive from the sample rate: not saved in checkpoints.
    assert set(encoder.state_dict()) == {n for n, _ in encoder.named_parameters()}
