"""TLS for a cluster (optional): every node serves HTTPS/WSS with a certificate the user
provides, and checks its peers' certificates against the user's CA.

The cluster secret already keeps strangers out of the ring (challenge-response), but without
TLS the activations and the API's prompts and answers cross the network in the clear, and a
peer that relays a handshake could sit in the middle of a link. With TLS every link is
encrypted and each node proves its identity by a certificate for the address it is reached at
(host name or IP address in the certificate's subjectAltName).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ..errors import PrimaError


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """What the node's listener presents; a missing or mismatched file is one clear error."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    def no_passphrase() -> str:  # never prompt on the terminal of a daemon
        raise PrimaError(f"the TLS key {key} is encrypted: give the node an unencrypted key "
                         "(readable by its user only)")

    try:
        ctx.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as exc:
        raise PrimaError(f"the TLS certificate {cert} and key {key} do not load together "
                         f"({exc.reason or exc}): both must be PEM, the key matching the "
                         "certificate") from None
    except OSError as exc:  # missing, unreadable, a directory, ...
        raise PrimaError(f"cannot read the TLS certificate or key {exc.filename or cert}: "
                         f"{exc.strerror or exc}") from None
    return ctx


def client_context(ca: Path | None) -> ssl.SSLContext:
    """How the node checks its peers: against ``ca`` (a PEM bundle, e.g. the home cluster's
    own CA), or the system's CAs when none is given. Host names are always checked."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise PrimaError(f"the TLS CA file {ca} is not a PEM certificate bundle "
                             f"({exc.reason or exc})") from None
        except OSError as exc:
            raise PrimaError(f"cannot read the TLS CA file {ca}: "
                             f"{exc.strerror or exc}") from None
    return ctx
