"""Audio front end in numpy: a hand-written mel filterbank and fixed-length log-mel spectrograms."""

from __future__ import annotations

import numpy as np

from fgjax.data._sources import pad_or_trim


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
  """HTK mel scale: `mel = 2595 log10(1 + hz / 700)`."""
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
  """Inverse of `hz_to_mel`: `hz = 700 (10^(mel / 2595) - 1)`."""
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def _mel_edges(num_mels: int, f_min: float, f_max: float) -> np.ndarray:
  """`num_mels + 2` frequencies (Hz) equally spaced in mel; filter m spans edges m..m+2."""
  return mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), num_mels + 2))


def mel_center_frequencies(
  num_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> np.ndarray:
  """The peak frequency (Hz) of each filter of `mel_filterbank`, shape (num_mels,), increasing."""
  f_max = sample_rate / 2 if f_max is None else f_max
  return _mel_edges(num_mels, f_min, f_max)[1:-1]


def mel_filterbank(
  num_fft: int, num_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> np.ndarray:
  """Triangular mel filters, as a matrix from an rfft power spectrum to mel energies.

  Filter m rises linearly from 0 at edge m to 1 at its center (edge m+1) and falls back to 0 at edge
  m+2, with `num_mels + 2` edges equally spaced on the HTK mel scale between `f_min` and `f_max`
  (default Nyquist). The triangles are evaluated at the FFT bin frequencies k * sample_rate /
  num_fft; peaks are 1 (no area normalization).

  Args:
    num_fft: FFT size; the spectrum has num_fft // 2 + 1 bins.
    num_mels: number of filters.
    sample_rate: in Hz.
    f_min: lowest edge, Hz.
    f_max: highest edge, Hz (default sample_rate / 2).

  Returns:
    float32 array (num_fft // 2 + 1, num_mels); `power @ filterbank` gives mel energies.
  """
  f_max = sample_rate / 2 if f_max is None else f_max
  if not 0 <= f_min < f_max <= sample_rate / 2:
    raise ValueError(
      f"mel_filterbank: need 0 <= f_min < f_max <= {sample_rate / 2}, got {f_min}, {f_max}."
    )
  edges = _mel_edges(num_mels, f_min, f_max)
  bins = np.arange(num_fft // 2 + 1) * sample_rate / num_fft
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (bins[:, None] - lower) / (center - lower)
  falling = (upper - bins[:, None]) / (upper - center)
  return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def log_mel_spectrogram(
  waveforms: np.ndarray,
  *,
  sample_rate: int = 8000,
  num_samples: int | None = 8000,
  num_fft: int = 256,
  hop_length: int = 80,
  num_mels: int = 40,
  f_min: float = 0.0,
  f_max: float | None = None,
  log_floor: float = 1e-6,
) -> np.ndarray:
  """Log-mel spectrogram of fixed length, for keyword spotting (e.g. FSDD into `fgjax.models.CRNN`).

  Waveforms are zero-padded or cut to `num_samples` (default 1 s at 8 kHz), split into frames of
  `num_fft` samples every `hop_length` samples (no centering padding), multiplied by a periodic Hann
  window; then `log(|rfft|^2 @ mel_filterbank + log_floor)`.

  Args:
    waveforms: (..., samples) float array.
    sample_rate: in Hz.
    num_samples: fixed length before framing (`None`: keep the input length).
    num_fft: frame and FFT size.
    hop_length: samples between frame starts.
    num_mels: mel filters.
    f_min: lowest mel edge, Hz.
    f_max: highest mel edge, Hz (default Nyquist).
    log_floor: added before the log so silence stays finite.

  Returns:
    float32 (..., frames, num_mels) with frames = 1 + (num_samples - num_fft) // hop_length (97 with
    the defaults). Add a channel axis (`[..., None]`) for `CRNN`.
  """
  waveforms = np.asarray(waveforms, np.float32)
  if num_samples is not None:
    waveforms = pad_or_trim(waveforms, num_samples)
  if waveforms.shape[-1] < num_fft:
    raise ValueError(f"log_mel_spectrogram: {waveforms.shape[-1]} samples < num_fft {num_fft}.")
  frames = np.lib.stride_tricks.sliding_window_view(waveforms, num_fft, axis=-1)[
    ..., ::hop_length, :
  ]
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(num_fft) / num_fft)
  power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
  mel = power @ mel_filterbank(num_fft, num_mels, sample_rate, f_min, f_max)
  return np.log(mel + log_floor).astype(np.float32)
