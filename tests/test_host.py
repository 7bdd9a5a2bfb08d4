"""lowbit/host.py: what the process asks of the machine it runs on."""

from lowbit import host


def test_memory_is_handed_back_only_after_the_margin_of_growth(monkeypatch):
    """The releaser trims the heap when the resident set grew by more than its margin since it last did, and
    measures from there again; growth within the margin (the control) trims nothing."""
    rss, trims = [100], []
    monkeypatch.setattr(host, "resident_bytes", lambda: rss[0])
    monkeypatch.setattr(host, "release_free_memory", lambda: (trims.append(rss[0]), rss.__setitem__(0, rss[0] - 30)))
    release = host.MemoryReleaser(margin=50)
    for value in (120, 150, 151, 160, 200, 215):
        rss[0] = value
        release()
    assert trims == [151, 200]                # 151 > 100 + 50; the floor is then 121, 200 > 171; 215 <= 170 + 50
    assert release.floor == 170


def test_the_resident_set_is_read():
    assert host.resident_bytes() > 1 << 20
