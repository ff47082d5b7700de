"""One real `lmpack serve` of an unpacked bundle, configured by serve.toml, over TLS, with the response cache on.

One process for all of them, because each start costs seconds on 2 cores: the file sets TLS and the
cache, and a flag overrides the file's (unusable) port, which shows flags win over the file.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from runtime_servers import Server, run_server

CHAT = {"messages": [{"role": "user", "content": "Tell me about trains"}], "max_tokens": 8}


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with cryptography for this test only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lmpack test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-features")
    conf = tmp / "conf"
    conf.mkdir()
    cert, _ = self_signed(conf)
    (conf / "serve.toml").write_text(
        "schema_version = 1\nport = 1\nmax_concurrency = 1\nqueue = 4\n"
        '[tls]\ncert = "server.crt"\nkey = "server.key"\n'
        "[cache]\nenabled = true\nmax_entries = 16\n"
    )
    with run_server(
        bundle_dir, "--config", str(conf / "serve.toml"), tmp=tmp, tls=ssl.create_default_context(cafile=str(cert))
    ) as running:
        yield running


def cache_counts(client: httpx.Client) -> tuple[float, float]:
    text = client.get("/metrics").text
    found = [
        float(re.search(rf"^lmpack_response_cache_{kind}_total (\S+)$", text, re.M).group(1))
        for kind in ("hits", "misses")
    ]
    return found[0], found[1]


def stream_pieces(client: httpx.Client, body: dict) -> list[str]:
    pieces = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    pieces.append(choices[0]["delta"]["content"])
    return pieces


def test_the_bundle_is_served_over_tls_with_the_chosen_variant(server, llama_variant):
    assert server.url.startswith("https://127.0.0.1:") and not server.url.endswith(":1")
    with server.client() as client:
        models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny", llama_variant.name]  # the bundle's name, then the variant's
    assert {m["root"] for m in models} == {llama_variant.name}  # int8, ranked before the fp32 copy
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate is refused
        httpx.get(f"{server.url}/health/live", timeout=5)
    assert "serving variant" in server.log.read_text()


def test_a_repeated_greedy_request_is_a_cache_hit(server):
    with server.client() as client:
        hits, misses = cache_counts(client)
        first = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0}).json()
        second = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0}).json()
        assert cache_counts(client) == (hits + 1, misses + 1)
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    assert second["usage"] == first["usage"] and second["id"] != first["id"]


def test_a_replayed_stream_sends_the_same_chunks(server):
    body = {
        **CHAT,
        "messages": [{"role": "user", "content": "Say something long"}],
        "max_tokens": 12,
        "seed": 7,
        "temperature": 0.9,
    }
    with server.client() as client:
        hits, _ = cache_counts(client)
        first, second = stream_pieces(client, body), stream_pieces(client, body)
        assert cache_counts(client)[0] == hits + 1
        plain = client.post("/v1/chat/completions", json=body).json()  # the same key: a hit, one piece
        assert cache_counts(client)[0] == hits + 2
    assert first and second == first and plain["choices"][0]["message"]["content"] == "".join(first)


def test_a_sampled_request_without_a_seed_is_never_cached(server):
    body = {**CHAT, "temperature": 0.8, "messages": [{"role": "user", "content": "Anything"}]}
    with server.client() as client:
        before = cache_counts(client)
        for _ in range(2):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert cache_counts(client) == before
