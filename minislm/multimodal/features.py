"""From a waveform to the log-mel spectrogram Phi-4-multimodal's speech encoder reads.

transformers' Phi4MultimodalFeatureExtractor, step by step, in NumPy:

    16 kHz samples in [-1, 1]                                        (L,)
      -> frames of 400 samples (25 ms) every 160 (10 ms), no padding  (T, 400)
         T = (L - 400) // 160 + 1: the tail that fills no frame is dropped
      -> pre-emphasis inside each frame: y[n] = x[n] - 0.97 x[n-1]
         (the frame's first sample uses itself as its predecessor), times 32768
      -> symmetric Hamming window, FFT of 512 (zero-padded)          (T, 257) complex
      -> power |X|^2 in float32
      -> 80 triangular mel filters between 0 and 7690 Hz, on Kaldi's mel scale
         1127 ln(1 + f / 700), the triangles drawn in mel space     (T, 80)
      -> natural log of max(energy, 1)

Pre-emphasis lifts the high frequencies, where speech has little energy; the mel
scale spaces the filters the way pitch is heard, narrow at the bottom, wide at the
top; the log makes loud and quiet sounds differ by sums, not factors.

The encoder then shrinks time 8-fold, so a prompt gets ceil(T / 8) audio tokens
(`audio_token_count`): 12.5 a second.
"""

import math

import numpy as np

from ..errors import MinislmError

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
N_FFT = 512
N_MELS = 80
PREEMPHASIS = 0.97
MEL_MIN_HZ, MEL_MAX_HZ = 0.0, 7690.0
COMPRESSION = 8  # the encoder's time reduction


def kaldi_mel(hz):
    """Hertz -> mels on Kaldi's scale (natural log)."""
    return 1127.0 * np.log(1.0 + hz / 700.0)


def mel_filters(n_bins: int = N_FFT // 2 + 1, n_mels: int = N_MELS) -> np.ndarray:
    """(257, 80) float32: the triangular filters, evaluated at each FFT bin's mel value
    (transformers' mel_filter_bank with triangularize_in_mel_space=True,
    mel_scale="kaldi", no area normalisation), in float64 and then rounded."""
    mel_points = np.linspace(kaldi_mel(MEL_MIN_HZ), kaldi_mel(MEL_MAX_HZ), n_mels + 2)  # edges and centres
    bin_width = SAMPLE_RATE / ((n_bins - 1) * 2)
    bins = kaldi_mel(bin_width * np.arange(n_bins))  # (257,) each bin's frequency, in mels
    gaps = np.diff(mel_points)
    slopes = mel_points[None, :] - bins[:, None]  # (257, 82)
    rising = -slopes[:, :-2] / gaps[:-1]
    falling = slopes[:, 2:] / gaps[1:]
    return np.maximum(np.zeros(1), np.minimum(rising, falling)).astype(np.float32)


def hamming_window(n: int = WINDOW) -> np.ndarray:
    """The symmetric Hamming window in float64, in torch.hamming_window's order of
    operations: 0.54 - 0.46 cos(2 pi k / (n - 1))."""
    return np.cos(np.arange(n, dtype=np.float64) * (2.0 * math.pi / (n - 1))) * -0.46 + 0.54


def frame_count(n_samples: int) -> int:
    """How many 25 ms frames a waveform of n samples gives (none below 400 samples)."""
    return max(0, (n_samples - WINDOW) // HOP + 1)


def audio_token_count(n_frames: int) -> int:
    """ceil(T / 8): the speech encoder's output length, one token each."""
    return -(-n_frames // COMPRESSION)


def frames(waveform: np.ndarray) -> np.ndarray:
    """(L,) -> (T, 400): overlapping windows every 160 samples, as a strided view."""
    T = frame_count(len(waveform))
    return np.lib.stride_tricks.as_strided(waveform, (T, WINDOW), (HOP * waveform.strides[0], waveform.strides[0]))


def log_mel(waveform: np.ndarray, block: int = 4096) -> np.ndarray:
    """(L,) float32 samples at 16 kHz -> (T, 80) float32 log-mel features.
    Frames are processed `block` at a time so a long recording needs little memory."""
    x = np.ascontiguousarray(waveform, dtype=np.float32)
    T = frame_count(len(x))
    if T == 0:
        raise MinislmError(f"the audio is {len(x) / SAMPLE_RATE * 1000:.1f} ms long; at least 25 ms "
                           f"({WINDOW} samples at 16 kHz) are needed for one frame")
    window, filters = hamming_window(), mel_filters()
    out = np.empty((T, N_MELS), dtype=np.float32)
    all_frames = frames(x)
    for start in range(0, T, block):
        f = all_frames[start : start + block]  # (t, 400) float32
        previous = np.concatenate([f[:, :1], f[:, :-1]], axis=1)  # each sample's predecessor in its frame
        emphasised = (f - np.float32(PREEMPHASIS) * previous) * np.float32(32768)
        spectrum = np.fft.rfft(window * emphasised.astype(np.float64), n=N_FFT, axis=1).astype(np.complex64)
        magnitude = np.hypot(spectrum.real, spectrum.imag)  # (t, 257) float32, as torch.abs rounds it
        energy = np.maximum((magnitude * magnitude) @ filters, np.float32(1.0))  # (t, 80)
        out[start : start + len(f)] = np.log(energy.astype(np.float64)).astype(np.float32)  # correctly rounded
    return out
