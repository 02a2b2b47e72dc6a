"""Phi-4-multimodal (`model_type: "phi4mm"`, or transformers' `"phi4_multimodal"`):
pictures and speech in, text out, over the Phi-4-mini decoder.

    config.py           the encoders' sizes, placeholder ids, adapters; tensor names of both layouts
    checkpoint.py       a checkpoint in either layout -> the hub's names and two LoRA adapters
    image.py            a photo -> 448 x 448 crops, a global view, patch masks, the token count
    siglip.py           SigLIP-so400m: views -> patch features
    image_embedding.py  2 x 2 pooling, separators, projector -> image tokens
    audio.py            sound files -> 16 kHz mono samples (soundfile, soxr)
    features.py         samples -> log-mel features
    conformer.py        the Conformer speech encoder: features -> one state per 80 ms
    audio_embedding.py  the two audio projectors -> audio tokens
    prompt.py           <|image_k|> / <|audio_k|> tags -> ids with placeholders, and the adapter

docs/multimodal.md follows one picture and one spoken sentence through it. Pillow
reads the images (`minislm[vision]`), soundfile and soxr the sound (`minislm[audio]`);
everything else is NumPy. The adapters themselves are minislm/lora.py.
"""
