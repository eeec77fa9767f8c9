import os

from dcmsort import inventory


def test_batches_are_stable_when_folders_are_added():
    before = {f"patient_{i}": inventory.batch_of(f"patient_{i}", 8) for i in range(200)}
    after = {f"patient_{i}": inventory.batch_of(f"patient_{i}", 8) for i in range(400)}
    assert all(after[f] == b for f, b in before.items())
    assert len(set(before.values())) == 8


def test_files_lying_in_input_dir_form_their_own_unit(tmp_path):
    (tmp_path / "patient_1").mkdir()
    (tmp_path / "patient_1" / "a").write_bytes(b"x")
    (tmp_path / "loose.dcm").write_bytes(b"y")
    assert inventory.list_folders(tmp_path) == ["patient_1", inventory.ROOT_FOLDER]
    assert [e.relpath for e in inventory.walk_folder(tmp_path, "")] == ["loose.dcm"]


def test_walk_finds_nested_files_and_reports_links_without_following(tmp_path):
    (tmp_path / "p" / "s" / "t").mkdir(parents=True)
    (tmp_path / "p" / "s" / "t" / "IM1").write_bytes(b"1")
    os.symlink("..", tmp_path / "p" / "s" / "loop")
    os.symlink("missing", tmp_path / "p" / "dangling")
    kinds = {e.relpath: e.kind for e in inventory.walk_folder(tmp_path, "p")}
    assert kinds == {
        "p/s/t/IM1": inventory.FILE,
        "p/s/loop": inventory.DIRECTORY_SYMLINK,
        "p/dangling": inventory.BROKEN_SYMLINK,
    }


def test_fingerprint_changes_when_a_file_is_added_replaced_or_rewritten(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "a").write_bytes(b"1")

    def fp():
        return inventory.fingerprint(inventory.walk_folder(tmp_path, "p"))

    first = fp()
    assert fp() == first
    (folder / "b").write_bytes(b"2")
    added = fp()
    os.utime(folder / "a", ns=(1, 10**18))
    rewritten = fp()
    (folder / "a").write_bytes(b"longer")
    replaced = fp()
    assert len({first, added, rewritten, replaced}) == 4


def test_manifest_names_never_collide_and_lead_back_to_their_folder():
    folders = ["", "%2F", "a b", "a%20b", ".root", "MÜLLER"]
    names = {inventory.manifest_name(f) for f in folders}
    assert len(names) == len(folders)
    assert [inventory.folder_of_manifest(inventory.manifest_name(f)) for f in folders] == folders


def test_auto_batches_grow_in_powers_of_two_with_the_number_of_folders():
    sizes = [inventory.auto_batches(n) for n in (1, 40, 4095, 4096, 10_000, 10**6)]
    assert sizes == [1, 1, 1, 2, 4, 64]


def test_names_that_are_not_utf8_are_listed_in_a_form_that_round_trips(tmp_path):
    root = os.fsencode(tmp_path)
    os.makedirs(root + b"/pat_\xe9/s")
    with open(root + b"/pat_\xe9/s/IM\xff.dcm", "wb") as handle:
        handle.write(b"x")
    assert inventory.list_folders(tmp_path) == ["pat_%E9"]
    [entry] = inventory.walk_folder(tmp_path, "pat_%E9")
    assert entry.relpath == "pat_%E9/s/IM%FF.dcm" and entry.kind == inventory.FILE
    assert os.fsencode(inventory.source_path(tmp_path, entry.relpath)) == (
        root + b"/pat_\xe9/s/IM\xff.dcm"
    )
    assert inventory.file_name(entry.relpath) == os.fsdecode(b"IM\xff.dcm")
    walks = inventory.walk_folders(tmp_path, ["pat_%E9"])
    assert inventory.batch_fingerprint(walks)
    # The Snakefile's walk reaches the extract job through a file, names and versions intact.
    folder = tmp_path / "walks"
    folder.mkdir()
    (folder / "batch-0-0123456789abcdef.marshal").write_bytes(b"a killed run's")
    path = folder / "batch-0-fedcba9876543210.marshal"
    inventory.write_walks(folder, {path: inventory.dump_walk(walks)})
    assert inventory.load_walk(path) == walks
    assert [p.name for p in folder.iterdir()] == [path.name]
    assert inventory.load_walk(folder / "none.marshal") is None
    assert inventory.encode_name("100%") == "100%25" and inventory.decode_name("100%25") == "100%"


def test_manifest_names_of_long_folders_are_bounded_and_distinct():
    folders = ["F" * 240, "F" * 239 + "G", "山" * 41, "山" * 85, "%" * 200]
    names = [inventory.manifest_name(f) for f in folders]
    assert len(set(names)) == len(folders)
    assert all(len(n.encode()) <= 150 for n in names)
    assert all(inventory.folder_of_manifest(n) is None for n in names)
    assert names[0].startswith("F" * 100)


def test_a_symlink_loop_is_reported_as_a_loop(tmp_path):
    (tmp_path / "p").mkdir()
    os.symlink("loop", tmp_path / "p" / "loop")
    [entry] = inventory.walk_folder(tmp_path, "p")
    assert entry.kind == inventory.SYMLINK_LOOP
