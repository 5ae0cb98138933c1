"""Image chat turns: for an OpenAI-compatible server, and for transformers' chat templates."""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_message(image_url: str, question: str) -> list[dict]:
    """One user turn with an image and a question, in the OpenAI chat format."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": question},
    ]}]


def template_image_turn(question: str) -> dict:
    """The same user turn as chat templates take it in transformers (the image itself goes to the processor)."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def demo_image(size: int = 224) -> Image.Image:
    """A red circle and a blue square on white: the question the demo asks is about it."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.1, size * 0.1, size * 0.45, size * 0.45), fill=(220, 30, 30))
    draw.rectangle((size * 0.55, size * 0.5, size * 0.9, size * 0.85), fill=(30, 60, 220))
    return image
