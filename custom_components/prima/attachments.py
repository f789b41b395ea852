"""Attachments for a model that reads text: text files go into the prompt, the rest is refused.

Home Assistant hands an AI Task its attachments as local files (a media-source file, a camera's
snapshot). The head serves text models, so an image can only be refused, with a message that says
so; a text file (a log, CSV, JSON, YAML, Markdown) is read off the event loop and given to the
model inside the user's message, under its name, as the core LLM integrations give their models
the files they can read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from homeassistant.exceptions import HomeAssistantError

from .const import DOMAIN

if TYPE_CHECKING:
    from homeassistant.components.conversation import Attachment

#: types other than ``text/*`` that are text
TEXT_TYPES = frozenset({
    "application/json", "application/ld+json", "application/x-ndjson", "application/xml",
    "application/yaml", "application/x-yaml", "application/toml", "application/csv",
    "application/javascript", "application/sql", "application/x-sh", "application/x-subrip",
})
#: the most of one file read: far more than a home model's context holds (the head refuses a
#: prompt longer than its context, saying so), little enough not to read a video by mistake
MAX_ATTACHMENT_BYTES = 1 << 20


def is_text(mime_type: str) -> bool:
    """Whether a file of ``mime_type`` is text a model can read."""
    base = mime_type.split(";", 1)[0].strip().lower()
    return (base.startswith("text/") or base in TEXT_TYPES
            or base.endswith(("+json", "+xml", "+yaml")))


def _refuse(key: str, attachment: Attachment, **extra: str) -> HomeAssistantError:
    return HomeAssistantError(translation_domain=DOMAIN, translation_key=key,
                              translation_placeholders={"name": attachment.path.name,
                                                        "type": attachment.mime_type, **extra})


def read_attachments(attachments: Sequence[Attachment]) -> str:
    """The attachments as text to follow the user's message; blocking (run in the executor).

    Raises HomeAssistantError (translated) for an image, another type that is not text, a
    file over ``MAX_ATTACHMENT_BYTES``, one that is not UTF-8 or cannot be read.
    """
    parts = []
    for attachment in attachments:
        if not is_text(attachment.mime_type):
            image = attachment.mime_type.lower().startswith("image/")
            raise _refuse("attachment_image" if image else "attachment_unsupported", attachment)
        try:
            size = attachment.path.stat().st_size
            if size > MAX_ATTACHMENT_BYTES:
                raise _refuse("attachment_too_large", attachment,
                              size=f"{size / 1e6:.1f}", limit=f"{MAX_ATTACHMENT_BYTES / 1e6:.1f}")
            text = attachment.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise _refuse("attachment_not_text", attachment) from err
        except OSError as err:
            raise _refuse("attachment_unreadable", attachment,
                          error=err.strerror or str(err)) from err
        parts.append(f'<file name="{attachment.path.name}" type="{attachment.mime_type}">\n'
                     f"{text.rstrip()}\n</file>")
    return "\n\n".join(parts)
