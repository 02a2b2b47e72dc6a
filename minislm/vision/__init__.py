"""Phi-3-vision and Phi-3.5-vision (`model_type: "phi3_v"`): how a language model sees.

    image.py      a photo -> global view + 336x336 crops (pixels), and the token count
    tower.py      CLIP ViT-L/14-336: crops -> patch features (the penultimate block's)
    embedding.py  2x2 merge, row and global separators, projector -> image tokens
    prompt.py     <|image_k|> tags -> token ids with placeholders, image by image

docs/vision.md walks through it with pictures. Pillow is needed for the images
(`pip install 'minislm[vision]'`); everything else is NumPy.
"""
