"""jobs.storage on local disk and over the S3 protocol (a moto server, directly and through a
proxy that injects throttles and connection resets)."""

import http.client
import os
import pickle
import threading
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.retries.standard import ExponentialBackoff

from jobs import storage as storage_mod
from jobs import storage_s3
from jobs.storage import (InvalidKeyError, ObjectInfo, open_storage, split_uri, validate_key)
from jobs.storage_local import LocalStorage
from jobs.storage_s3 import S3Storage

# --- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a", "a/b.json", "stages/tok-1a2b3c4d/_COMMIT.json", "a/.hidden",
                                 "a/..b", "x y/é"])
def test_validate_key_accepts_clean_relative_paths(key):
    assert validate_key(key) == key


@pytest.mark.parametrize("key, why", [
    ("", "it is empty"),
    ("/etc/passwd", "it is absolute"),
    ("..", "it has a '..' segment"),
    ("a/../b", "it has a '..' segment"),
    ("a/..", "it has a '..' segment"),
    ("./a", "it has a '.' segment"),
    ("a/./b", "it has a '.' segment"),
    ("a//b", "it has an empty segment"),
    ("a\\b", "it contains a backslash"),
    ("a\x00b", "it contains a NUL or control character"),
    ("a\nb", "it contains a NUL or control character"),
    ("a/", "it ends with '/'"),
    (None, "it is not a string"),
])
def test_validate_key_rejects_naming_the_key_the_reason_and_a_fix(key, why):
    with pytest.raises(InvalidKeyError) as exc:
        validate_key(key)
    bad_key, _, rest = str(exc.value).partition(": ")
    reason, _, fix = rest.partition("; ")
    assert (bad_key, reason) == (f"invalid storage key {key!r}", why) and fix


def test_invalid_key_error_is_a_value_error():
    assert issubclass(InvalidKeyError, ValueError)


# --- URIs ---------------------------------------------------------------------------------


def test_open_storage_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_storage(f"file://{tmp_path}/x/").uri == f"file://{tmp_path}/x"
    assert open_storage("file://./rel").uri == f"file://{tmp_path}/rel"
    assert open_storage("file://rel").uri == f"file://{tmp_path}/rel"
    assert open_storage("rel/sub").uri == f"file://{tmp_path}/rel/sub"
    assert open_storage(str(tmp_path)).uri == f"file://{tmp_path}"
    assert open_storage("s3://bucket").uri == "s3://bucket"
    assert open_storage("s3://bucket/").uri == "s3://bucket"
    assert open_storage("s3://bucket/a/b/").uri == "s3://bucket/a/b"
    assert open_storage("s3://bucket/a/b").url("c/d.json") == "s3://bucket/a/b/c/d.json"
    assert open_storage("s3://bucket").url("c") == "s3://bucket/c"


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://127.0.0.1/x", "file://s3://x"])
def test_open_storage_rejects_other_schemes_naming_the_supported_ones(uri):
    with pytest.raises(ValueError, match="unsupported storage URI") as exc:
        open_storage(uri)
    assert repr(uri) in str(exc.value) and "s3://" in str(exc.value)
    assert "file://" in str(exc.value)


@pytest.mark.parametrize("uri", ["s3://", "s3:///x", "s3://bucket/a/../b", "file://", ""])
def test_open_storage_rejects_malformed(uri):
    with pytest.raises(ValueError):
        open_storage(uri)


def test_split_uri(tmp_path):
    storage, name = split_uri("s3://b/data/x.jsonl")
    assert (storage.uri, name) == ("s3://b/data", "x.jsonl")
    storage, name = split_uri("s3://b/x.jsonl")
    assert (storage.uri, name) == ("s3://b", "x.jsonl")
    (tmp_path / "x.jsonl").write_text("{}\n")
    for uri in (str(tmp_path / "x.jsonl"), f"file://{tmp_path}/x.jsonl"):
        storage, name = split_uri(uri)
        assert (storage.uri, name) == (f"file://{tmp_path}", "x.jsonl")
        assert storage.read_bytes(name) == b"{}\n"
    for bad in ("s3://b", "s3://b/data/", "gs://b/x"):
        with pytest.raises(ValueError):
            split_uri(bad)


def test_a_file_at_the_filesystem_root():
    storage, name = split_uri("/x.jsonl")
    assert (storage.uri, storage.url(name)) == ("file:///", "file:///x.jsonl")
    assert pickle.loads(pickle.dumps(storage)).uri == "file:///"


# --- behaviour shared by both backends ------------------------------------------------------


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.local)])
def store(request, tmp_path):
    if request.param == "file":
        return open_storage(f"file://{tmp_path}/root")
    return open_storage(request.getfixturevalue("s3_bucket") + "/root")


def test_write_read_info_exists_delete(store):
    assert not store.exists("a/b.txt") and store.info("a/b.txt") is None
    store.write_bytes("a/b.txt", b"hello")
    assert store.read_bytes("a/b.txt") == b"hello"
    info = store.info("a/b.txt")
    assert info.key == "a/b.txt" and info.size == 5 and info.version
    store.write_bytes("a/b.txt", b"hello, again")  # overwrite
    assert store.read_bytes("a/b.txt") == b"hello, again"
    assert store.info("a/b.txt").version != info.version
    assert not store.exists("a")  # a 'directory' is not an object
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # missing is fine
    assert not store.exists("a/b.txt")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/b.txt")
    with pytest.raises(FileNotFoundError):
        store.read_range("a/b.txt", 0, 1)


def test_every_method_validates_keys(store, tmp_path):
    for call in (lambda: store.read_bytes("../x"), lambda: store.write_bytes("/x", b""),
                 lambda: store.create_bytes("a//b", b""), lambda: store.info("a/"),
                 lambda: store.sub(".."), lambda: store.list("../"), lambda: store.url("a/./b"),
                 lambda: store.upload_dir(tmp_path, "../up")):
        with pytest.raises(InvalidKeyError):
            call()


def test_read_range_is_a_slice(store):
    data = bytes(range(100))
    store.write_bytes("r.bin", data)
    for start, end in [(0, 10), (10, 20), (95, 100), (95, 200), (100, 120), (150, 160), (7, 7)]:
        assert store.read_range("r.bin", start, end) == data[start:end]
    with pytest.raises(ValueError):
        store.read_range("r.bin", 5, 4)


def test_create_bytes_is_create_only(store):
    assert store.create_bytes("c/_COMMIT.json", b"first") is True
    assert store.create_bytes("c/_COMMIT.json", b"second") is False
    assert store.read_bytes("c/_COMMIT.json") == b"first"
    store.write_bytes("c/_COMMIT.json", b"overwritten")  # write_bytes still may overwrite
    assert store.read_bytes("c/_COMMIT.json") == b"overwritten"


def test_create_bytes_race_has_one_winner(store):
    results = {}

    def attempt(i):
        results[i] = store.create_bytes("race/_COMMIT.json", f"writer {i}".encode())

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, created in results.items() if created]
    assert len(winners) == 1
    assert store.read_bytes("race/_COMMIT.json") == f"writer {winners[0]}".encode()


def test_list_is_recursive_sorted_relative_and_prefix_raw(store):
    for key in ["stages/tok-2/b", "stages/tok-1/a", "stages/tok-1/sub/c", "stages/corpus-1/x",
                "runs/r1/run.json", "stagesque"]:
        store.write_bytes(key, key.encode())
    assert [o.key for o in store.list()] == sorted(
        ["stages/tok-2/b", "stages/tok-1/a", "stages/tok-1/sub/c", "stages/corpus-1/x",
         "runs/r1/run.json", "stagesque"])
    assert [o.key for o in store.list("stages/tok-")] == [
        "stages/tok-1/a", "stages/tok-1/sub/c", "stages/tok-2/b"]
    assert [o.key for o in store.list("stages/")] == [
        "stages/corpus-1/x", "stages/tok-1/a", "stages/tok-1/sub/c", "stages/tok-2/b"]
    assert [o.key for o in store.list("stages")][-1] == "stagesque"
    assert store.list("nothing/") == []
    obj = store.list("runs/")[0]
    assert obj == ObjectInfo("runs/r1/run.json", len(b"runs/r1/run.json"), obj.version)
    assert obj == store.info("runs/r1/run.json")


def test_sub_is_rooted_below(store):
    sub = store.sub("stages/tok-1")
    sub.write_bytes("vocab.json", b"{}")
    assert sub.uri == store.uri + "/stages/tok-1"
    assert store.read_bytes("stages/tok-1/vocab.json") == b"{}"
    assert [o.key for o in sub.list()] == ["vocab.json"]
    assert sub.url("vocab.json") == store.url("stages/tok-1/vocab.json")


def test_delete_prefix(store):
    for key in ["ckpt/step-1/a", "ckpt/step-1/b/c", "ckpt/step-2/a", "other"]:
        store.write_bytes(key, b"x")
    assert store.delete_prefix("ckpt/step-1/") == 2
    assert [o.key for o in store.list()] == ["ckpt/step-2/a", "other"]
    assert store.delete_prefix("nothing/") == 0
    assert store.delete_prefix("") == 2 and store.list() == []


def test_upload_and_download_file(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    store.upload_file(src, "files/src.bin")
    assert store.read_bytes("files/src.bin") == src.read_bytes()
    dest = tmp_path / "out" / "deep" / "copy.bin"
    store.download_file("files/src.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert os.listdir(dest.parent) == ["copy.bin"]  # no temp file left behind
    with pytest.raises(FileNotFoundError):
        store.download_file("files/missing.bin", tmp_path / "out" / "missing.bin")
    assert not (tmp_path / "out" / "missing.bin").exists()


def _make_tree(root):
    files = {"a.txt": b"a", "sub/b.bin": os.urandom(100), "sub/deeper/c": b"", "d e.txt": b"d"}
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_upload_dir_and_download_prefix(store, tmp_path):
    files = _make_tree(tmp_path / "tree")
    keys = store.upload_dir(tmp_path / "tree", "stages/x-1")
    assert sorted(keys) == sorted(f"stages/x-1/{rel}" for rel in files)
    assert [o.key for o in store.list("stages/x-1/")] == sorted(keys)
    store.write_bytes("stages/x-10/not-this", b"")  # a sibling sharing the name's start
    got = store.download_prefix("stages/x-1", tmp_path / "copy")
    assert sorted(got) == sorted(keys)
    for rel, data in files.items():
        assert (tmp_path / "copy" / rel).read_bytes() == data
    assert not (tmp_path / "copy" / "not-this").exists()
    assert store.upload_dir(tmp_path / "tree", "") and store.read_bytes("sub/b.bin") == files[
        "sub/b.bin"]


def test_download_prefix_never_escapes_the_destination(store, tmp_path, monkeypatch):
    store.write_bytes("p/ok", b"ok")
    real_list = type(store).list

    def list_with_hostile_key(self, prefix=""):  # as if a server returned a crafted key
        return real_list(self, prefix) + [ObjectInfo("p/a/../../../etc/passwd", 1, "v")]

    with monkeypatch.context() as patched:
        patched.setattr(type(store), "list", list_with_hostile_key)
        with pytest.raises(InvalidKeyError, match="refusing to download"):
            store.download_prefix("p", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()  # checked before anything was written

    # A symlink inside the destination must not be a way out either.
    (tmp_path / "outside").mkdir()
    (tmp_path / "dest2").mkdir()
    (tmp_path / "dest2" / "link").symlink_to(tmp_path / "outside")
    store.write_bytes("q/link/pwned", b"x")
    with pytest.raises(InvalidKeyError, match="outside"):
        store.download_prefix("q", tmp_path / "dest2")
    assert os.listdir(tmp_path / "outside") == []


def test_pickles_by_uri(store):
    store.write_bytes("k", b"v")  # builds the S3 client: it must not be pickled
    clone = pickle.loads(pickle.dumps(store))
    assert type(clone) is type(store) and clone.uri == store.uri
    assert clone.read_bytes("k") == b"v"
    assert b"testing" not in pickle.dumps(store)  # the test credentials
    assert "testing" not in repr(store) and repr(store) == f"{type(store).__name__}('{store.uri}')"


# --- local disk specifics -------------------------------------------------------------------


def test_local_write_is_atomic(tmp_path, monkeypatch):
    store = LocalStorage(tmp_path)
    store.write_bytes("f", b"old")

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(storage_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.write_bytes("f", b"new")
    assert store.read_bytes("f") == b"old"
    assert os.listdir(tmp_path) == ["f"]  # the temp file was cleaned up


def test_local_list_ignores_temp_files_of_writes_in_flight(tmp_path):
    store = LocalStorage(tmp_path)
    store.write_bytes("d/real", b"x")
    with storage_mod._temp_beside(str(tmp_path / "d" / "real")) as tmp1, \
            storage_mod._temp_beside(str(tmp_path / "d" / "new")) as tmp2:
        for tmp in (tmp1, tmp2):
            open(tmp, "wb").close()
        assert len(os.listdir(tmp_path / "d")) == 3
        assert [o.key for o in store.list()] == ["d/real"]


def test_local_create_bytes_leaves_no_temp(tmp_path):
    store = LocalStorage(tmp_path)
    assert store.create_bytes("c", b"1") and not store.create_bytes("c", b"2")
    assert os.listdir(tmp_path) == ["c"]


def test_local_delete_prefix_removes_emptied_dirs(tmp_path):
    store = LocalStorage(tmp_path)
    store.write_bytes("ckpt/step-1/a/b", b"x")
    store.write_bytes("ckpt/step-2/a", b"x")
    assert store.delete_prefix("ckpt/step-1/") == 1
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step-2"]


# --- S3 specifics (a moto server: the "local" tier) ------------------------------------------


@pytest.mark.local
def test_s3_bucket_root_without_prefix(s3_bucket):
    store = open_storage(s3_bucket)
    assert isinstance(store, S3Storage) and store.uri == s3_bucket
    store.write_bytes("a/b", b"1")
    assert [o.key for o in store.list()] == ["a/b"]
    assert store.url("a/b") == f"{s3_bucket}/a/b"


@pytest.mark.local
def test_s3_create_only_is_enforced_by_the_server(s3_bucket):
    """moto honors If-None-Match: * on PutObject (a raw client sees the 412)."""
    store = open_storage(s3_bucket)
    assert store.create_bytes("m", b"1")
    client = boto3.client("s3")
    with pytest.raises(client.exceptions.ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=store.bucket, Key="m", Body=b"2", IfNoneMatch="*")
    # Same bytes as already there: our own earlier attempt, whose response was lost.
    assert store.create_bytes("m", b"1") is True
    assert store.create_bytes("m", b"2") is False


@pytest.mark.local
def test_s3_download_prefix_refuses_a_dot_dot_key_the_server_lists(s3_bucket, tmp_path):
    store = open_storage(s3_bucket + "/root")
    store.write_bytes("p/ok", b"ok")
    # S3 keys are arbitrary strings: another client can store this one, and it is listed back.
    boto3.client("s3").put_object(Bucket=store.bucket, Key="root/p/../../../escape", Body=b"x")
    assert "p/../../../escape" in [o.key for o in store.list("p/")]
    with pytest.raises(InvalidKeyError, match="refusing to download"):
        store.download_prefix("p", tmp_path / "a" / "b" / "dest")
    assert not (tmp_path / "a").exists() and not (tmp_path / "escape").exists()


@pytest.mark.local
def test_s3_multipart_upload(s3_bucket, tmp_path, monkeypatch):
    # S3 (and moto) require parts of at least 5 MiB, so this is the smallest multipart upload.
    monkeypatch.setattr(storage_s3, "MULTIPART_BYTES", 5 * 1024 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    store = open_storage(s3_bucket)
    store.upload_file(big, "big.bin")
    info = store.info("big.bin")
    assert info.size == big.stat().st_size and info.version.endswith("-3")  # 3 parts
    assert store.read_range("big.bin", 5 * 1024 * 1024 - 3, 5 * 1024 * 1024 + 3) == \
        big.read_bytes()[5 * 1024 * 1024 - 3:5 * 1024 * 1024 + 3]
    store.download_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


@pytest.fixture
def through_proxy(s3_fault_proxy, monkeypatch):
    """boto3 talks to moto through the fault proxy, with quick retries.

    AWS_RETRY_MODE=standard and tiny backoff keep this test fast: 'adaptive' (opt-in)
    rate-limits the client after throttles, down to ~0.5 requests/s, and botocore's throttle
    backoff starts at up to 1 s; both are right against real S3 and only slow here."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_fault_proxy.url)
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    for scale in ("throttling_base_scale", "non_throttling_base_scale"):
        monkeypatch.setitem(ExponentialBackoff._DEFAULT_BACKOFF_CONFIG, scale, 0.001)
    return s3_fault_proxy


@pytest.mark.local
def test_s3_survives_throttles_and_resets(s3_bucket, through_proxy, tmp_path):
    store = open_storage(s3_bucket + "/flaky")
    for i in range(30):
        data = f"object {i} ".encode() * i
        store.write_bytes(f"w/{i}", data)
        assert store.read_bytes(f"w/{i}") == data
        assert store.create_bytes(f"c/{i}", data) is True
        assert store.create_bytes(f"c/{i}", b"other") is False
        assert [o.key for o in store.list(f"w/{i}")] == [f"w/{i}"]  # w/{i}0.. come later
    assert len(store.list("w/")) == 30 and len(store.list("c/")) == 30
    files = _make_tree(tmp_path / "tree")
    store.upload_dir(tmp_path / "tree", "tree")
    store.download_prefix("tree", tmp_path / "copy")
    for rel, data in files.items():
        assert (tmp_path / "copy" / rel).read_bytes() == data
    assert store.delete_prefix("") == 30 + 30 + len(files)
    assert through_proxy.num_slowdowns > 0 and through_proxy.num_resets > 0
    assert through_proxy.num_faults > 0.2 * through_proxy.num_requests


@pytest.mark.local
def test_s3_create_bytes_when_the_response_is_lost(s3_bucket, through_proxy):
    """The PUT lands, the client never hears, botocore retries and gets 412: still ours."""
    through_proxy.fail_rate = 0
    through_proxy.lose_next_responses = 1
    store = open_storage(s3_bucket)
    assert store.create_bytes("commit", b"mine") is True
    # PUT (landed, answer lost), PUT again (412), GET (the bytes are ours)
    assert (through_proxy.num_lost_responses, through_proxy.num_forwarded) == (1, 3)
    assert store.create_bytes("commit", b"theirs") is False


@pytest.mark.local
def test_proxy_relays_chunked_request_bodies_on_a_kept_alive_connection(s3_bucket, s3_fault_proxy):
    s3_fault_proxy.fail_rate = 0
    proxy = urlsplit(s3_fault_proxy.url)
    conn = http.client.HTTPConnection(proxy.hostname, proxy.port)
    bucket = s3_bucket.removeprefix("s3://")
    for i in range(2):  # one connection, two requests
        conn.request("PUT", f"/{bucket}/chunked-{i}", body=iter([b"hello ", b"chunked"]),
                     encode_chunked=True)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"")
    conn.close()
    store = open_storage(s3_bucket)
    assert [store.read_bytes(f"chunked-{i}") for i in range(2)] == [b"hello chunked"] * 2
    assert s3_fault_proxy.num_forwarded == 2
