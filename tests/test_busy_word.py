"""busy_word.py: a leased worker's busy word, on real files in a private dir."""

import os
import stat

import pytest

from pyramid_powerhose.busy_word import BUSY, BusyWord, open_reader, path_for


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "direct"
    path.mkdir(mode=0o700)
    return str(path)


def test_the_word_lives_beside_the_direct_socket():
    assert path_for("/run/x/direct/12-ab.sock") == "/run/x/direct/12-ab.busy"
    assert path_for("/run/x/direct/12-ab.socket") is None


def test_what_the_worker_writes_the_broker_reads(folder):
    path = os.path.join(folder, "1-a.busy")
    word = BusyWord(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        reader = open_reader(path, folder)
        assert reader.read() == 0
        word.word[0] = BUSY
        assert reader.read() == BUSY
        word.word[0] = 123456789012345
        assert reader.read() == 123456789012345
        reader.close()
    finally:
        word.close()
    assert not os.path.exists(path)
    word.close()  # twice: nothing more


def test_a_word_is_made_only_where_none_is(folder):
    path = os.path.join(folder, "1-a.busy")
    with open(path, "wb") as f:
        f.write(b"\0" * 8)
    with pytest.raises(FileExistsError):
        BusyWord(path)
    assert os.path.exists(path)  # not ours to remove


def test_the_broker_trusts_only_an_8_byte_file_in_the_direct_directory(folder, tmp_path):
    assert open_reader(os.path.join(folder, "none.busy"), folder) is None  # an older worker
    elsewhere = tmp_path / "1-a.busy"
    elsewhere.write_bytes(b"\0" * 8)
    assert open_reader(str(elsewhere), folder) is None
    link = os.path.join(folder, "2-b.busy")
    os.symlink(str(elsewhere), link)
    assert open_reader(link, folder) is None
    short = os.path.join(folder, "3-c.busy")
    with open(short, "wb") as f:
        f.write(b"\0" * 4)
    assert open_reader(short, folder) is None
    os.mkdir(os.path.join(folder, "4-d.busy"))
    assert open_reader(os.path.join(folder, "4-d.busy"), folder) is None
    good = os.path.join(folder, "5-e.busy")
    with open(good, "wb") as f:
        f.write(b"\0" * 8)
    reader = open_reader(good, folder)
    assert reader is not None and reader.read() == 0
    reader.close()
