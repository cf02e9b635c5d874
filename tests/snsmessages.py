"""Real signed SNS messages for tests: a key and certificate made here, SES event bodies.

The webhook gets this certificate through the verifier's fetch seam (Fetcher below), never
through configuration or the request: the production checks stay as they are.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from pgcast.api import sns

TOPIC = "arn:aws:sns:us-east-1:123456789012:pgcast-feedback"
CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem"
SUBSCRIBE_URL = ("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription"
                 f"&TopicArn={TOPIC}&Token=abc")


@functools.cache
def key_and_cert() -> tuple[rsa.RSAPrivateKey, bytes]:
    """An RSA key and a self-signed certificate for it (PEM), made once per session."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Fetcher:
    """The verifier's fetch seam: serves the test certificate, records every URL asked for."""

    urls: list[str] = field(default_factory=list)

    def __call__(self, url: str) -> bytes:
        """The certificate for CERT_URL, a confirmation answer for an SNS API URL."""
        self.urls.append(url)
        if url == CERT_URL:
            return key_and_cert()[1]
        return b"<ConfirmSubscriptionResponse/>"


def stamp(when: dt.datetime | None = None) -> str:
    """An SNS Timestamp (UTC, milliseconds, Z)."""
    when = when or dt.datetime.now(dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{when.microsecond // 1000:03d}Z"


def sign(message: dict[str, Any], version: str = "1") -> dict[str, Any]:
    """The message with SignatureVersion and a real Signature over its canonical string."""
    key = key_and_cert()[0]
    out = {**message, "SignatureVersion": version}
    digest = hashes.SHA1() if version == "1" else hashes.SHA256()
    out["Signature"] = base64.b64encode(
        key.sign(sns.canonical(out), padding.PKCS1v15(), digest)).decode()
    return out


def notification(event: dict[str, Any], *, version: str = "1", topic: str = TOPIC,
                 timestamp: str | None = None, message_id: str | None = None,
                 cert_url: str = CERT_URL, subject: str | None = None) -> dict[str, Any]:
    """A signed SNS Notification carrying one SES event."""
    msg: dict[str, Any] = {
        "Type": "Notification", "MessageId": message_id or str(uuid.uuid4()), "TopicArn": topic,
        "Message": json.dumps(event), "Timestamp": timestamp or stamp(),
        "SigningCertURL": cert_url,
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe"}
    if subject is not None:
        msg["Subject"] = subject
    return sign(msg, version)


def subscription(kind: str = "SubscriptionConfirmation", *, version: str = "1",
                 topic: str = TOPIC, subscribe_url: str = SUBSCRIBE_URL,
                 cert_url: str = CERT_URL) -> dict[str, Any]:
    """A signed SubscriptionConfirmation (or UnsubscribeConfirmation)."""
    return sign({"Type": kind, "MessageId": str(uuid.uuid4()), "TopicArn": topic,
                 "Token": "abc", "Message": f"You have chosen to subscribe to {topic}.",
                 "SubscribeURL": subscribe_url, "Timestamp": stamp(),
                 "SigningCertURL": cert_url}, version)


def ses_event(kind: str, address: str, *, broadcast: Any = None, contact: Any = None,
              shape: str = "eventType", bounce_type: str = "Permanent",
              at: dt.datetime | None = None) -> dict[str, Any]:
    """An SES event as SES publishes it (eventType) or notifies it (notificationType)."""
    when = stamp(at)
    mail: dict[str, Any] = {"timestamp": when, "messageId": str(uuid.uuid4()),
                            "source": "news@example.com", "destination": [address]}
    if broadcast is not None:
        mail["tags"] = {"pgcast_broadcast": [str(broadcast)], "pgcast_contact": [str(contact)],
                        "ses:configuration-set": ["pgcast"]}
    body: dict[str, Any] = {shape: kind, "mail": mail}
    if kind == "Bounce":
        body["bounce"] = {"bounceType": bounce_type, "bounceSubType": "General",
                          "timestamp": when, "bouncedRecipients": [{
                              "emailAddress": address, "status": "5.1.1",
                              "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]}
    elif kind == "Complaint":
        body["complaint"] = {"timestamp": when, "complaintFeedbackType": "abuse",
                             "complainedRecipients": [{"emailAddress": address}]}
    elif kind == "Delivery":
        body["delivery"] = {"timestamp": when, "recipients": [address]}
    return body
