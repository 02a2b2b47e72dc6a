"""Sound files -> 16 kHz mono samples -> log-mel features.

Reading and resampling are plumbing, done by two well-kept libraries, installed
with `pip install 'minislm[audio]'` (an optional extra, like Pillow for images):

* soundfile (libsndfile's Python binding): WAV in every PCM width and as float,
  FLAC, OGG/Vorbis and (libsndfile >= 1.1, bundled in its wheels) MP3. It reads the
  header first, so a file's length and format are known before its samples are
  decoded: that is where a 10-hour recording, an empty file or an unknown format is
  refused, before anything large is allocated. 16-bit PCM becomes x / 32768, the
  scaling the reference's examples use.
* soxr (the SoX resampler): the model hears 16 kHz; anything else is resampled with
  soxr's "HQ" filter. Its passband is flat to about 0.91 x the Nyquist frequency and
  it is the default of librosa; transformers' feature extractor itself refuses any
  other rate, so the resampler is minislm's choice, not a reference's.

Several channels are averaged to one.
"""

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MinislmError
from .features import SAMPLE_RATE, audio_token_count, frame_count, log_mel

MAX_SECONDS = 30 * 60  # 30 minutes: 22,500 audio tokens, the longest input the model card speaks of
MAX_CHANNELS = 16
MIN_RATE, MAX_RATE = 1000, 768000


@dataclass(frozen=True)
class ProcessedAudio:
    """One recording, ready for the speech encoder.

    features:    (T, 80) float32 log-mel frames, 10 ms apart
    samples:     (L,) float32 16 kHz mono samples the features came from
    source_rate: the file's sample rate; source_channels its channel count
    """

    features: np.ndarray
    samples: np.ndarray
    source_rate: int
    source_channels: int = 1

    @property
    def num_tokens(self) -> int:
        return audio_token_count(len(self.features))

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    def describe(self) -> str:
        """e.g. '2.40 s at 44100 Hz, 2 channels -> 240 mel frames -> 30 tokens'."""
        channels = f", {self.source_channels} channels" if self.source_channels != 1 else ""
        return (f"{self.seconds:.2f} s at {self.source_rate} Hz{channels} -> {len(self.features)} mel frames "
                f"-> {self.num_tokens} tokens")


def require_audio_libraries():
    """soundfile and soxr, or a one-line error saying how to get them."""
    try:
        import soundfile
        import soxr
    except ImportError:
        raise MinislmError("audio needs soundfile and soxr: pip install 'minislm[audio]'") from None
    return soundfile, soxr


def read_audio(source, name: str | None = None) -> tuple[np.ndarray, int, int]:
    """A sound file (a path, or bytes from a request) -> (samples (L,) float32 mono at its
    own rate, that rate, its channel count). Checked from the header before decoding."""
    soundfile, _ = require_audio_libraries()
    if isinstance(source, (bytes, bytearray)):
        name = name or "audio"
        data = bytes(source)
        if not data:
            raise MinislmError(f"{name}: the audio is empty (0 bytes)")
        check_wav_header(data[:4096], len(data), name)
        opened = io.BytesIO(data)
    else:
        path = Path(source)
        name = name or str(path)
        if not path.is_file():
            raise MinislmError(f"{name}: {'is a folder, not a sound file' if path.is_dir() else 'no such sound file'}")
        size = path.stat().st_size
        if size == 0:
            raise MinislmError(f"{name}: the file is empty (0 bytes)")
        with open(path, "rb") as f:
            check_wav_header(f.read(4096), size, name)
        opened = path
    try:
        info = soundfile.info(opened)
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise MinislmError(f"{name}: not a sound file soundfile can read ({str(e).splitlines()[-1][:120]})") from None
    check_header(info.samplerate, info.channels, info.frames, name)
    if isinstance(opened, io.BytesIO):
        opened.seek(0)
    try:
        samples, rate = soundfile.read(opened, dtype="float32", always_2d=True)  # (L, channels)
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise MinislmError(f"{name}: damaged sound file ({str(e).splitlines()[-1][:120]})") from None
    if len(samples) == 0:
        raise MinislmError(f"{name}: the file holds no samples")
    if not np.isfinite(samples).all():
        raise MinislmError(f"{name}: the samples hold NaN or Inf values")
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(mono), int(rate), samples.shape[1]


def check_header(rate: int, channels: int, frames: int, name: str) -> None:
    """What the header promises, refused before a sample is decoded."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise MinislmError(f"{name}: a sample rate of {rate} Hz is outside {MIN_RATE}..{MAX_RATE}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise MinislmError(f"{name}: {channels} channels; at most {MAX_CHANNELS} are read")
    if frames <= 0:
        raise MinislmError(f"{name}: the file holds no samples")
    seconds = frames / rate
    if seconds > MAX_SECONDS:
        raise MinislmError(f"{name}: {seconds / 60:.1f} minutes of audio; at most {MAX_SECONDS // 60} minutes "
                           "are accepted (cut it first)")


def check_wav_header(head: bytes, size: int, name: str) -> None:
    """A RIFF/WAVE file states the size of its sample data: a file shorter than that was
    cut off (libsndfile would quietly read what is there). Other formats pass here."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    offset = 12
    while offset + 8 <= len(head):
        chunk, length = head[offset : offset + 4], struct.unpack("<I", head[offset + 4 : offset + 8])[0]
        if chunk == b"data":
            if length != 0xFFFFFFFF and offset + 8 + length > size:  # 0xFFFFFFFF: a streamed file of unknown length
                raise MinislmError(f"{name}: truncated WAV file: its header promises {length} bytes of samples, "
                                   f"the file holds {size - offset - 8}")
            return
        offset += 8 + length + (length & 1)


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono samples at `rate` -> 16 kHz (soxr, "HQ"); 16 kHz passes untouched."""
    if rate == SAMPLE_RATE:
        return samples
    _, soxr = require_audio_libraries()
    return np.ascontiguousarray(soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ"), dtype=np.float32)


def process_audio(source, name: str | None = None) -> ProcessedAudio:
    """A sound file (path or bytes), or (samples, rate) -> log-mel features for the encoder."""
    if isinstance(source, tuple):
        samples, rate = source
        samples, channels = np.asarray(samples, dtype=np.float32), 1
        if samples.ndim == 2:
            samples, channels = samples.mean(axis=1, dtype=np.float32), samples.shape[1]
        check_header(int(rate), channels, len(samples), name or "audio")
    else:
        samples, rate, channels = read_audio(source, name)
    at_16k = resample(samples, rate)
    if frame_count(len(at_16k)) == 0:
        raise MinislmError(f"{name or source if not isinstance(source, (bytes, tuple)) else 'audio'}: "
                           f"{len(at_16k) / SAMPLE_RATE * 1000:.1f} ms of audio; at least 25 ms are needed")
    return ProcessedAudio(log_mel(at_16k), at_16k, int(rate), channels)
