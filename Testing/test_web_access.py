"""Who may reach the browser app and which files it touches: the checks on their own, then the real server bound to
a non-loopback address refusing a request without its token."""
from __future__ import annotations

import http.client
import os
import re
import shutil

import pytest

from conftest import shared

from PEFTAdaptLib.errors import InputError  # noqa: E402
from PEFTAdaptLib.web import access  # noqa: E402


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("192.168.1.4", False),
                                            ("example.org", False)])
def test_loopback_addresses(host, loopback):
    assert access.is_loopback(host) is loopback


def test_a_token_is_required_off_loopback_only(monkeypatch):
    monkeypatch.delenv(access.TOKEN_ENV, raising=False)
    assert access.access_token("127.0.0.1") is None
    made = access.access_token("0.0.0.0")
    assert made and made != access.access_token("0.0.0.0") and not made.isdigit()
    monkeypatch.setenv(access.TOKEN_ENV, "chosen")
    assert access.access_token("0.0.0.0") == "chosen" and access.access_token("127.0.0.1") == "chosen"


def refusal(headers=None, query=None, cookies=None, token=None, loopback=True):
    headers = {"Host": "127.0.0.1:8080", **(headers or {})}
    return access.check_request(headers, query or {}, cookies or {}, token, loopback)


def test_requests_on_loopback():
    assert refusal() is None
    assert refusal({"Host": "localhost:8080"}) is None
    assert "not a loopback name" in refusal({"Host": "attacker.example:8080"})  # DNS rebinding
    upgrade = {"Upgrade": "websocket", "Origin": "http://127.0.0.1:8080"}
    assert refusal(upgrade) is None
    assert "another site" in refusal({**upgrade, "Origin": "https://evil.example"})


def test_requests_with_a_token():
    remote = {"Host": "server.lan:8080"}
    assert "token is required" in refusal(remote, token="secret", loopback=False)
    assert "token is required" in refusal(remote, query={"token": "wrong"}, token="secret", loopback=False)
    assert refusal(remote, query={"token": "secret"}, token="secret", loopback=False) is None
    assert refusal(remote, cookies={access.TOKEN_COOKIE: "secret"}, token="secret", loopback=False) is None


def test_paths_stay_inside_their_folder(tmp_path):
    (tmp_path / "data" / "case").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("x")
    os.symlink(tmp_path / "secret.txt", tmp_path / "data" / "link.nii.gz")
    assert access.inside(tmp_path / "data", "case") == (tmp_path / "data" / "case").resolve()
    for escape in ("../secret.txt", "/etc/passwd", "link.nii.gz", "case/../../secret.txt"):
        with pytest.raises(InputError, match="outside"):
            access.inside(tmp_path / "data", escape)


def test_uploads_are_renamed_into_the_work_folder_and_checked(tmp_path, monkeypatch):
    saved = access.save_upload(tmp_path / "uploads", "../../evil/t1.nii.gz", b"data")
    assert saved.parent.parent == tmp_path / "uploads" and saved.name == "t1.nii.gz"
    again = access.save_upload(tmp_path / "uploads", "t1.nii.gz", b"other")
    assert again != saved and saved.read_bytes() == b"data"
    with pytest.raises(InputError, match="second file"):
        access.upload_name("scan.nhdr")
    with pytest.raises(InputError, match="unsupported file type"):
        access.upload_name("notes.txt")
    monkeypatch.setattr(access, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(InputError, match="over the upload limit"):
        access.save_upload(tmp_path / "uploads", "big.nrrd", b"x" * 11)


def test_an_upload_of_an_unknown_type_lists_only_the_types_an_upload_takes():
    """Found by a user-level check: the refusal of `readme.txt` listed .mhd, .png and .dcm, which uploads refuse."""
    with pytest.raises(InputError) as refused:
        access.upload_name("folder/readme.txt")
    text = str(refused.value)
    assert text.startswith("readme.txt: unsupported file type") and text.endswith(", ".join(access.UPLOAD_SUFFIXES))
    assert not any(other in text for other in (".mhd", ".nhdr", ".png", ".dcm"))


def test_the_data_folder_lists_image_files_by_relative_path():
    files, _ = access.data_files(shared("spine"))
    assert "t2/t2.nii.gz" in files and "t2/t2_seg-manual.nii.gz" in files
    assert all(not f.startswith("/") and not f.endswith(("LICENSE", ".json", ".txt")) for f in files)


def test_the_data_folder_lists_as_label_maps_only_the_json_files_that_are_label_maps(tmp_path):
    """Its JSON files are often something else: the shared data's MeshNet folders hold model.json and colormap.json."""
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "aseg-to-gw.json").write_text('{"White Matter": [2, 41], "Grey Matter": "1000-2999"}')
    shutil.copy(shared("meshnet/model18cls/colormap.json"), tmp_path / "colormap.json")
    shutil.copy(shared("meshnet/model18cls/model.json"), tmp_path / "model.json")
    (tmp_path / "t1.nii.gz").write_bytes(b"")
    assert access.data_files(tmp_path) == (["t1.nii.gz"], ["maps/aseg-to-gw.json"])
    assert access.upload_name("folder/aseg-to-gw.json") == "aseg-to-gw.json"  # uploaded, it is read as a map later


def test_the_server_off_loopback_refuses_a_request_without_its_token(tmp_path, monkeypatch):
    from test_web_e2e import AppServer

    monkeypatch.delenv(access.TOKEN_ENV, raising=False)
    server = AppServer(tmp_path / "work", host="0.0.0.0")
    try:
        port, token = int(re.search(r":(\d+)/", server.url).group(1)), server.url.split("?token=")[1]

        def get(path, headers=None):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", path, headers={"Host": f"server.lan:{port}", **(headers or {})})
            response = connection.getresponse()
            return response.status, response.getheader("Set-Cookie") or "", response.read().decode(errors="replace")

        status, _, body = get("/index.html")
        assert status == 403 and "token" in body
        assert get("/ws")[0] == 403
        status, cookie, _ = get(f"/index.html?token={token}")
        assert status == 200 and f"{access.TOKEN_COOKIE}={token}" in cookie and "HttpOnly" in cookie
        assert get("/index.html", {"Cookie": f"{access.TOKEN_COOKIE}={token}"})[0] == 200
    finally:
        server.stop()
