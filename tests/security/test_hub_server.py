"""The local Hub (``hf-optim hub serve``) facing hostile or broken clients, over raw HTTP to a real subprocess.

Requests are written byte by byte (``socket``) or with ``http.client``, so nothing in a client library can
tidy them up; the real huggingface_hub client checks that honest uploads still work. References are
independent of the server: sha256 digests computed here with hashlib, bytes as uploaded, HTTP status classes
from RFC 9110/9112 (400 malformed, 401 no credentials, 404 not found, 411 length required, 413 too large,
416 unsatisfiable range).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from hf_optim.hub_server.server import is_loopback
from tests.hub_plugin import HubProcess, spawn_hub_server

SECRET = "s3cret-hub-token"
LFS_JSON = "application/vnd.git-lfs+json"


# ---------------------------------------------------------------------- raw HTTP helpers
def address(hub: HubProcess) -> tuple[str, int]:
    url = urlsplit(hub.endpoint)
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


def request(
    hub: HubProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request with http.client: (status, headers, body)."""
    conn = http.client.HTTPConnection(*address(hub), timeout=60)
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def raw_exchange(hub: HubProcess, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` as is (request line, headers, body); read the reply until the server is done with it."""
    with socket.create_connection(address(hub), timeout=30) as sock:
        sock.sendall(data)
        reply = bytearray()
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        head, _, rest = bytes(reply).partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        body = bytearray(rest)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, bytes(body[:length])


def stream_until_refused(hub: HubProcess, head: bytes, total: int, *, chunked: bool) -> tuple[int, int]:
    """Send ``head`` then up to ``total`` body bytes while reading the reply: (status, body bytes sent)."""
    sock = socket.create_connection(address(hub), timeout=30)
    sent = 0
    stop = threading.Event()
    block = b"a" * (1 << 20)  # one endless line: no parser can refuse it before the limit does

    def sender() -> None:
        nonlocal sent
        try:
            sock.sendall(head)
            while sent < total and not stop.is_set():
                sock.sendall(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
                sent += len(block)
            if chunked and not stop.is_set():
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server closed the connection: what an early refusal looks like
            pass

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        reply = bytearray()
        while b"\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    finally:
        stop.set()
        thread.join(60)
        sock.close()
    return int(bytes(reply).split(b" ", 2)[1]), sent


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lfs_batch(
    hub: HubProcess, repo_id: str, operation: str, data: bytes, token: str | None
) -> tuple[int, dict]:
    body = {
        "operation": operation,
        "transfers": ["basic"],
        "objects": [{"oid": sha256(data), "size": len(data)}],
    }
    status, _, raw = request(
        hub,
        "POST",
        f"/{repo_id}.git/info/lfs/objects/batch",
        json.dumps(body).encode(),
        {"Content-Type": LFS_JSON, "Accept": LFS_JSON},
        token,
    )
    return status, (json.loads(raw)["objects"][0] if status == 200 else {})


def put(hub: HubProcess, href: str, data: bytes, token: str | None = None) -> int:
    url = urlsplit(href)
    return request(hub, "PUT", f"{url.path}?{url.query}" if url.query else url.path, data, token=token)[0]


def ndjson_commit(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def commit_lfs_file(hub: HubProcess, repo_id: str, path: str, data: bytes, token: str, **header: str) -> int:
    """A raw commit naming an LFS object by its sha256 (what the client sends after uploading it)."""
    body = ndjson_commit(
        [
            {"key": "header", "value": {"summary": f"add {path}", **header}},
            {
                "key": "lfsFile",
                "value": {"path": path, "algo": "sha256", "oid": sha256(data), "size": len(data)},
            },
        ]
    )
    return request(
        hub,
        "POST",
        f"/api/models/{repo_id}/commit/main",
        body,
        {"Content-Type": "application/x-ndjson"},
        token,
    )[0]


@pytest.fixture(scope="module")
def guarded_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """A server started with --token and LFS for .safetensors/.bin, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("guarded") / "hub"
    with spawn_hub_server(
        root, lfs_extensions=(".safetensors", ".bin"), token=SECRET, require_token=True
    ) as hub:
        yield hub


def new_repo(hub: HubProcess, name: str, *, private: bool = False) -> str:
    body = json.dumps({"name": name, "private": private}).encode()
    status, _, raw = request(
        hub, "POST", "/api/repos/create", body, {"Content-Type": "application/json"}, hub.token
    )
    assert status == 200, raw
    return f"local-user/{name}"


# ---------------------------------------------------------------------- LFS uploads: signed URLs and the token
def test_lfs_upload_needs_a_valid_signature_or_the_token(guarded_hub: HubProcess) -> None:
    repo = new_repo(guarded_hub, "signed")
    other = new_repo(guarded_hub, "signed-other")
    data, decoy = os.urandom(4000), os.urandom(4000)

    assert lfs_batch(guarded_hub, repo, "upload", data, None)[0] == 401
    assert lfs_batch(guarded_hub, repo, "upload", data, "not-the-token")[0] == 401
    status, obj = lfs_batch(guarded_hub, repo, "upload", data, SECRET)
    assert status == 200
    href = obj["actions"]["upload"]["href"]
    url = urlsplit(href)
    query = dict(parse_qsl(url.query))
    assert set(query) == {"expires", "signature"}

    def with_query(path: str, **changes: str) -> str:
        return f"{url.scheme}://{url.netloc}{path}?{urlencode({**query, **changes})}"

    unsigned = f"{url.scheme}://{url.netloc}{url.path}"
    forged = with_query(url.path, signature="0" * 64)
    later = with_query(url.path, expires=str(int(query["expires"]) + 3600))  # the signature covers the expiry
    expired = with_query(url.path, expires="1000")
    decoy_path = url.path.replace(sha256(data), sha256(decoy))  # another object under this object's signature
    other_repo = url.path.replace(repo, other)  # this object, in another repo
    for bad_href, payload in [
        (unsigned, data),
        (forged, data),
        (later, data),
        (expired, data),
        (with_query(decoy_path), decoy),
        (with_query(other_repo), data),
    ]:
        assert put(guarded_hub, bad_href, payload) == 401, bad_href
        assert put(guarded_hub, bad_href, payload, token="not-the-token") == 401, bad_href
    assert "actions" in lfs_batch(guarded_hub, repo, "upload", data, SECRET)[1]  # nothing was received

    assert put(guarded_hub, href, data) == 200  # the signed href needs no token, as S3's
    assert "actions" not in lfs_batch(guarded_hub, repo, "upload", data, SECRET)[1]
    assert put(guarded_hub, unsigned.replace(repo, other), data, token=SECRET) == 200  # or the token
    assert "actions" not in lfs_batch(guarded_hub, other, "upload", data, SECRET)[1]


def test_real_client_uploads_lfs_files_to_a_guarded_server(guarded_hub: HubProcess, tmp_path: Path) -> None:
    assert os.environ["HF_HUB_DISABLE_XET"] == "1"  # the LFS path of huggingface_hub
    api = HfApi(endpoint=guarded_hub.endpoint, token=SECRET)
    repo = api.create_repo("local-user/client-lfs", private=True).repo_id
    weights, extra = os.urandom(60_000), os.urandom(10_000)
    info = api.create_commit(
        repo,
        [CommitOperationAdd("optimizer.safetensors", weights), CommitOperationAdd("sub/extra.bin", extra)],
        commit_message="lfs",
    )
    tree = {f.path: f for f in api.list_repo_tree(repo, recursive=True) if hasattr(f, "lfs")}
    assert tree["optimizer.safetensors"].lfs.sha256 == sha256(weights)
    for path, data in (("optimizer.safetensors", weights), ("sub/extra.bin", extra)):
        got = hf_hub_download(repo, path, endpoint=guarded_hub.endpoint, token=SECRET, cache_dir=tmp_path)
        assert Path(got).read_bytes() == data
    assert api.model_info(repo).sha == info.oid
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(endpoint=guarded_hub.endpoint, token="not-the-token").upload_file(
            path_or_fileobj=weights, path_in_repo="x.safetensors", repo_id=repo
        )
    assert excinfo.value.response.status_code in (401, 404)


# ---------------------------------------------------------------------- blobs are reached only through their repo
def test_private_lfs_objects_do_not_leak_through_other_repos(guarded_hub: HubProcess) -> None:
    secret_data = os.urandom(5000)
    oid = sha256(secret_data)
    api = HfApi(endpoint=guarded_hub.endpoint, token=SECRET)
    private = api.create_repo("local-user/private-weights", private=True).repo_id
    api.upload_file(path_or_fileobj=secret_data, path_in_repo="w.safetensors", repo_id=private)
    public = new_repo(guarded_hub, "public-attacker")
    download = f"/{{repo}}.git/info/lfs/objects/download/{oid}"

    # The owner reads it through the private repo, by the batch API's signed href or with the token.
    status, obj = lfs_batch(guarded_hub, private, "download", secret_data, SECRET)
    assert status == 200
    signed = urlsplit(obj["actions"]["download"]["href"])
    assert request(guarded_hub, "GET", f"{signed.path}?{signed.query}")[2] == secret_data
    assert request(guarded_hub, "GET", download.format(repo=private), token=SECRET)[2] == secret_data
    # A signed download href is bound to its repo and object.
    assert request(guarded_hub, "GET", f"{download.format(repo=public)}?{signed.query}")[0] == 404

    # Nobody else: not without the token, not through another repo, not by naming the hash in a commit.
    for repo, token in ((private, None), (private, "not-the-token"), (public, None), (public, SECRET)):
        status, _, body = request(guarded_hub, "GET", download.format(repo=repo), token=token)
        assert status == 404 and secret_data not in body
        assert request(guarded_hub, "GET", f"/{repo}/resolve/main/w.safetensors", token=token)[0] == 404
    assert "error" in lfs_batch(guarded_hub, public, "download", secret_data, SECRET)[1]
    assert (
        "actions" in lfs_batch(guarded_hub, public, "upload", secret_data, SECRET)[1]
    )  # no existence oracle
    assert commit_lfs_file(guarded_hub, public, "stolen.safetensors", secret_data, SECRET) == 400
    assert request(guarded_hub, "GET", f"/{public}/resolve/main/stolen.safetensors", token=SECRET)[0] == 404

    # Whoever holds the bytes may upload them to their repo: then their repo serves their copy.
    href = lfs_batch(guarded_hub, public, "upload", secret_data, SECRET)[1]["actions"]["upload"]["href"]
    assert put(guarded_hub, href, secret_data) == 200
    assert commit_lfs_file(guarded_hub, public, "own.safetensors", secret_data, SECRET) == 200
    assert request(guarded_hub, "GET", f"/{public}/resolve/main/own.safetensors")[2] == secret_data


def test_failed_commits_leave_no_reachable_blob(guarded_hub: HubProcess) -> None:
    repo = new_repo(guarded_hub, "failed-commit")
    other = new_repo(guarded_hub, "failed-commit-other")
    data = os.urandom(3000)
    href = lfs_batch(guarded_hub, repo, "upload", data, SECRET)[1]["actions"]["upload"]["href"]
    assert put(guarded_hub, href, data) == 200
    # The commit fails (stale parent commit): the uploaded object stays out of reach.
    assert commit_lfs_file(guarded_hub, repo, "w.safetensors", data, SECRET, parentCommit="0" * 40) == 412
    for target in (repo, other):
        status, _, body = request(
            guarded_hub, "GET", f"/{target}.git/info/lfs/objects/download/{sha256(data)}", token=SECRET
        )
        assert status == 404 and data not in body
        assert "error" in lfs_batch(guarded_hub, target, "download", data, SECRET)[1]
        assert request(guarded_hub, "GET", f"/{target}/resolve/main/w.safetensors", token=SECRET)[0] == 404
    assert commit_lfs_file(guarded_hub, other, "w.safetensors", data, SECRET) == 400
    assert not (Path(guarded_hub.root) / "blobs" / sha256(data)[:2] / sha256(data)).exists()
    # The same upload can still be committed to the repo it was sent to.
    assert commit_lfs_file(guarded_hub, repo, "w.safetensors", data, SECRET) == 200
    assert request(guarded_hub, "GET", f"/{repo}/resolve/main/w.safetensors")[2] == data


def test_real_client_failed_commit_leaves_nothing_downloadable(
    hub_api: HfApi, hub_repo_id: str, hub_server
) -> None:
    hub_api.create_repo(hub_repo_id)
    data = os.urandom(8000)
    with pytest.raises(HfHubHTTPError) as excinfo:
        hub_api.create_commit(
            hub_repo_id,
            [CommitOperationAdd("w.safetensors", data)],
            commit_message="x",
            parent_commit="0" * 40,
        )
    assert excinfo.value.response.status_code == 412
    status, _, body = request(
        hub_server,
        "GET",
        f"/{hub_repo_id}.git/info/lfs/objects/download/{sha256(data)}",
        token=hub_server.token,
    )
    assert status == 404 and data not in body
    assert not hub_api.file_exists(hub_repo_id, "w.safetensors")


# ---------------------------------------------------------------------- body framing and limits
def test_oversized_chunked_body_is_refused_early(hub_server: HubProcess) -> None:
    total = 300 << 20
    head = (
        b"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    status, sent = stream_until_refused(hub_server, head, total, chunked=True)
    assert status == 413
    assert sent < 100 << 20  # refused after the JSON limit (16 MiB) plus socket buffers, not after 300 MB


def test_oversized_commit_body_is_refused_early(spawn_hub_server_factory) -> None:
    with spawn_hub_server_factory(extra_args=["--max-upload-size", "1M"]) as hub:
        new_repo(hub, "small")
        path = "/api/models/local-user/small/commit/main"
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
            "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        status, sent = stream_until_refused(hub, head, 300 << 20, chunked=True)
        assert status == 413 and sent < 100 << 20
        declared = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Length: {300 << 20}\r\n\r\n"
        assert raw_exchange(hub, declared.encode())[0] == 413  # refused before any body byte is sent
        # Under the limit, the same endpoint works.
        body = ndjson_commit(
            [
                {"key": "header", "value": {"summary": "small"}},
                {"key": "file", "value": {"path": "a.txt", "content": "YQ==", "encoding": "base64"}},
            ]
        )
        status, _, _ = request(hub, "POST", path, body, {"Content-Type": "application/x-ndjson"}, "t")
        assert status == 200
        assert request(hub, "GET", "/local-user/small/resolve/main/a.txt")[2] == b"a"


def test_lfs_upload_larger_than_signed_size_is_refused(
    hub_server: HubProcess, hub_api: HfApi, hub_repo_id: str
) -> None:
    hub_api.create_repo(hub_repo_id)
    data = os.urandom(1000)
    href = lfs_batch(hub_server, hub_repo_id, "upload", data, hub_server.token)[1]["actions"]["upload"][
        "href"
    ]
    url = urlsplit(href)
    head = f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\nContent-Length: {300 << 20}\r\n\r\n".encode()
    assert raw_exchange(hub_server, head)[0] == 413
    status, sent = stream_until_refused(
        hub_server,
        f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode(),
        300 << 20,
        chunked=True,
    )
    assert status == 413 and sent < 100 << 20
    assert "actions" in lfs_batch(hub_server, hub_repo_id, "upload", data, hub_server.token)[1]


_CREATE = b"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
_CHUNKED = b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
# id -> (the raw bytes sent, the status expected: a number, or None for any 4xx)
RAW_REQUESTS = {
    # body framing
    "content-length-negative": (_CREATE + b"Content-Length: -1\r\n\r\n{}", 400),
    "content-length-not-a-number": (_CREATE + b"Content-Length: abc\r\n\r\n{}", 400),
    "content-length-float": (_CREATE + b"Content-Length: 1e3\r\n\r\n{}", 400),
    "content-length-list": (_CREATE + b"Content-Length: 2, 3\r\n\r\n{}", 400),
    "content-length-twice": (_CREATE + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
    "content-length-and-chunked": (
        _CREATE + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        400,
    ),
    "transfer-encoding-gzip": (_CREATE + b"Transfer-Encoding: gzip\r\n\r\n{}", 400),
    "transfer-encoding-gzip-chunked": (_CREATE + b"Transfer-Encoding: gzip, chunked\r\n\r\n{}", 400),
    "no-length": (_CREATE + b"\r\n{}", 411),
    # chunked bodies
    "chunk-size-not-hex": (_CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n", 400),
    "chunk-size-negative": (_CHUNKED + b"-2\r\n{}\r\n0\r\n\r\n", 400),
    "chunk-without-its-line-end": (_CHUNKED + b"2\r\n{}XX0\r\n\r\n", 400),
    # request lines and headers
    "no-target": (b"GET\r\n\r\n", None),
    "request-line-extra-field": (b"GET / HTTP/1.1 extra\r\n\r\n", None),
    "protocol-not-http": (b"GET / HTTX/1.1\r\n\r\n", None),
    "unknown-method": (b"BREW /coffee HTTP/1.1\r\nHost: x\r\n\r\n", None),
    "header-of-70k": (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", None),
    "200-headers": (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", None),
}


@pytest.mark.parametrize(("data", "expected"), RAW_REQUESTS.values(), ids=RAW_REQUESTS.keys())
def test_malformed_raw_request_gets_a_short_4xx(
    hub_server: HubProcess, data: bytes, expected: int | None
) -> None:
    status, body = raw_exchange(hub_server, data)
    assert status == expected if expected is not None else 400 <= status < 500, status
    assert b"Traceback" not in body and b"<html" not in body.lower() and len(body) < 500


# ---------------------------------------------------------------------- malformed requests: 4xx, short, no internals
def _malformed_requests(repo: str) -> list[tuple[str, str, bytes | None, dict[str, str]]]:
    js = {"Content-Type": "application/json"}
    nd = {"Content-Type": "application/x-ndjson"}
    commit = f"/api/models/{repo}/commit/main"

    def lines(*items: dict) -> bytes:
        return ndjson_commit(list(items))

    header = {"key": "header", "value": {"summary": "s"}}
    return [
        ("POST", "/api/repos/create", b"{bad json", js),
        ("POST", "/api/repos/create", b"[1, 2]", js),
        ("POST", "/api/repos/create", b'"name"', js),
        ("POST", "/api/repos/create", b"\xff\xfe", js),
        ("POST", "/api/repos/create", b'{"name": "bad name!"}', js),
        ("POST", "/api/repos/create", b'{"name": 5}', js),
        ("POST", "/api/repos/create", b'{"name": "ok", "organization": "a/b"}', js),
        ("POST", "/api/repos/create", b'{"name": "ok", "type": "nonsense"}', js),
        ("POST", "/api/repos/create", b'{"name": "ok", "type": 5}', js),
        ("POST", "/api/repos/create", b'{"name": "ok", "organization": ["x"]}', js),
        ("POST", "/api/repos/create", b"\xff=1", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("DELETE", "/api/repos/delete", b'{"name": "../../etc"}', js),
        ("POST", "/api/repos/move", b'{"fromRepo": 1, "toRepo": []}', js),
        ("POST", "/api/repos/move", f'{{"fromRepo": "{repo}", "toRepo": "x/../y"}}'.encode(), js),
        ("GET", "/api/models/a..b/c", None, {}),
        ("GET", "/api/models/only-namespace", None, {}),
        ("GET", "/api/models/%00/%ff", None, {}),
        ("GET", "/api/unknown-type/x/y", None, {}),
        ("GET", "/nope", None, {}),
        ("GET", "/a/b/c/d", None, {}),
        ("PATCH", f"/api/models/{repo}", b"{}", js),
        ("GET", f"/{repo}/resolve/main/%00", None, {}),
        ("GET", f"/{repo}/resolve/main/../../hf-optim-hub.json", None, {}),
        ("GET", f"/{repo}/resolve/main/..%2F..%2Fhf-optim-hub.json", None, {}),
        ("GET", f"/{repo}/resolve/no-such-branch/x", None, {}),
        ("GET", f"/{repo}/resolve//x", None, {}),
        ("GET", f"/{repo}/resolve/main/.gitattributes", None, {"Range": "bytes=abc"}),
        ("GET", f"/{repo}/resolve/main/.gitattributes", None, {"Range": "bytes=5-2"}),
        ("GET", f"/{repo}/resolve/main/.gitattributes", None, {"Range": "bytes=-"}),
        ("GET", f"/{repo}/resolve/main/.gitattributes", None, {"Range": "bytes=0-1,4-5"}),
        ("GET", f"/{repo}/resolve/main/.gitattributes", None, {"Range": "bytes=99999999999-"}),
        ("GET", f"/{repo}/resolve/main/.gitattributes", None, {"Range": "bytes=\u00b2-"}),
        ("GET", f"/api/models/{repo}/tree/main?cursor=-1", None, {}),
        ("GET", f"/api/models/{repo}/tree/main?limit=abc", None, {}),
        ("GET", f"/api/models/{repo}/tree/main?cursor=%C2%B2", None, {}),
        ("GET", f"/api/models/{repo}/tree/main/no/such/folder", None, {}),
        ("GET", f"/api/models/{repo}/discussions/%C2%B2", None, {}),
        ("GET", f"/api/models/{repo}/discussions/99", None, {}),
        ("GET", f"/api/models/{repo}/revision/%ff%fe", None, {}),
        ("GET", "/api/models?limit=%C2%B2", None, {"Authorization": "Bearer "}),
        ("POST", f"/api/models/{repo}/preupload/main", b'{"files": "x"}', js),
        ("POST", f"/api/models/{repo}/preupload/main", b'{"files": [1]}', js),
        ("POST", f"/api/models/{repo}/preupload/main", b'{"files": [{"path": "a", "size": "big"}]}', js),
        ("POST", f"/api/models/{repo}/preupload/main", b'{"files": [{"path": "../a", "size": 1}]}', js),
        ("POST", f"/api/models/{repo}/paths-info/main", b'{"paths": 5}', js),
        ("POST", f"/api/models/{repo}/branch/new", b'{"startingPoint": 5}', js),
        ("POST", f"/api/models/{repo}/branch/..", b"{}", js),
        ("POST", f"/api/models/{repo}/tag/main", b'{"tag": ["x"]}', js),
        ("POST", f"/api/models/{repo}/discussions", b'{"title": ""}', js),
        ("POST", commit, b"not json\n", nd),
        ("POST", commit, b"[1]\n", nd),
        ("POST", commit, lines({"key": "header", "value": "x"}), nd),
        ("POST", commit, lines({"key": "header", "value": {"summary": "s", "parentCommit": 5}}), nd),
        ("POST", commit, lines(header, {"key": "file", "value": {"path": "a", "content": 5}}), nd),
        ("POST", commit, lines(header, {"key": "file", "value": {"path": "a", "content": "%%%"}}), nd),
        (
            "POST",
            commit,
            lines(header, {"key": "file", "value": {"path": "a", "content": "", "encoding": 3}}),
            nd,
        ),
        ("POST", commit, lines(header, {"key": "file", "value": {"path": "/abs", "content": ""}}), nd),
        (
            "POST",
            commit,
            lines(header, {"key": "lfsFile", "value": {"path": "a", "oid": "x", "size": "1"}}),
            nd,
        ),
        (
            "POST",
            commit,
            lines(header, {"key": "lfsFile", "value": {"path": "a", "oid": "0" * 64, "size": -1}}),
            nd,
        ),
        ("POST", commit, lines(header, {"key": "deletedFile", "value": {"path": "missing"}}), nd),
        ("POST", commit, lines(header, {"key": "mystery", "value": {"path": "a"}}), nd),
        ("POST", commit, lines({"key": "file", "value": {"path": "a", "content": ""}}), nd),
        ("POST", f"/{repo}.git/info/lfs/objects/batch", b'{"operation": "delete"}', js),
        ("POST", f"/{repo}.git/info/lfs/objects/batch", b'{"operation": "upload", "objects": "x"}', js),
        ("PUT", f"/{repo}.git/info/lfs/objects/upload/xyz/1", b"x", {}),
        ("PUT", f"/{repo}.git/info/lfs/objects/upload/{'0' * 64}/\u00b2", b"x", {}),
        ("GET", f"/{repo}.git/info/lfs/objects/download/{'0' * 64}", None, {}),
        ("GET", f"/{repo}.git/info/lfs/objects/download/../../blobs", None, {}),
        ("GET", "/api/whoami-v2", None, {"Authorization": "Basic Zm9vOmJhcg=="}),
        ("POST", "/api/repos/create", b'{"name": "x"}', {"Authorization": "Bearer"}),
    ]


def test_malformed_requests_get_short_4xx_replies(
    hub_server: HubProcess, hub_api: HfApi, hub_repo_id: str
) -> None:
    hub_api.create_repo(hub_repo_id)
    failures = []
    for method, path, body, headers in _malformed_requests(hub_repo_id):
        headers = {"Host": "x", "Authorization": f"Bearer {hub_server.token}", **headers}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        status, reply = raw_exchange(
            hub_server, head.encode("utf-8") + (body or b"")
        )  # raw UTF-8 bytes as sent
        if not 400 <= status < 500 or b"Traceback" in reply or b".py" in reply or len(reply) > 600:
            failures.append((method, path, status, reply[:300]))
    assert failures == []
    assert hub_api.model_info(hub_repo_id).siblings[0].rfilename == ".gitattributes"  # nothing was committed


def test_server_keeps_serving_after_malformed_requests(hub_server: HubProcess) -> None:
    raw_exchange(hub_server, b"POST /api/repos/create HTTP/1.1\r\nContent-Length: -5\r\n\r\n")
    status, _, body = request(hub_server, "GET", "/api/whoami-v2", token=hub_server.token)
    assert status == 200 and json.loads(body)["name"] == "local-user"


# ---------------------------------------------------------------------- where the token comes from
def _whoami(hub: HubProcess, token: str) -> int:
    return request(hub, "GET", "/api/whoami-v2", token=token)[0]


def test_token_from_environment_variable(spawn_hub_server_factory) -> None:
    env = {**os.environ, "HF_OPTIM_HUB_TOKEN": "from-the-environment"}
    with spawn_hub_server_factory(token="from-the-environment", env=env) as hub:
        assert _whoami(hub, "from-the-environment") == 200
        assert _whoami(hub, "anything-else") == 401
        body = json.dumps({"name": "env-guarded"}).encode()
        assert (
            request(hub, "POST", "/api/repos/create", body, {"Content-Type": "application/json"}, "x")[0]
            == 401
        )


def test_token_from_file_wins_over_environment(spawn_hub_server_factory, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    env = {**os.environ, "HF_OPTIM_HUB_TOKEN": "from-the-environment"}
    with spawn_hub_server_factory(
        token="from-a-file", env=env, extra_args=["--token-file", str(token_file)]
    ) as hub:
        assert _whoami(hub, "from-a-file") == 200
        assert _whoami(hub, "from-the-environment") == 401


@pytest.mark.parametrize(
    "args",
    [
        ["--token", "a", "--token-file", "f"],
        ["--token-file", "{missing}"],
        ["--token-file", "{empty}"],
        ["--token", "  "],
        ["--max-upload-size", "lots"],
    ],
)
def test_bad_token_options_are_refused(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "empty").write_text("\n")
    args = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "hf_optim.hub_server", "--root", str(tmp_path / "hub"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert result.stdout == ""  # no URL printed: it never served
    assert ("--token" in result.stderr) or ("--max-upload-size" in result.stderr)


def test_listening_beyond_localhost_without_token_warns(spawn_hub_server_factory) -> None:
    with spawn_hub_server_factory(host="0.0.0.0") as hub:
        assert _whoami(hub, "any") == 200
    log = hub.log()
    assert "WARNING" in log and "without a token" in log and "0.0.0.0" in log

    with spawn_hub_server_factory(host="0.0.0.0", require_token=True) as hub:
        assert _whoami(hub, hub.token) == 200
    assert "without a token" not in hub.log()
    with spawn_hub_server_factory() as hub:  # 127.0.0.1
        assert _whoami(hub, "any") == 200
    assert "without a token" not in hub.log()
    with spawn_hub_server_factory(host="0.0.0.0", cli=True) as hub:  # `hf-optim hub serve` logs at INFO
        assert _whoami(hub, "any") == 200
    assert "without a token" in hub.log()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected
