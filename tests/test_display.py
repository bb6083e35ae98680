"""What a person reads on a terminal (chopsticks.display): remote text can
not repaint the terminal, and facts read as indented values and tables."""
from chopsticks.display import printable, printable_block, value_lines


def test_control_characters_are_escaped_tabs_kept():
    forged = "harmless\r[db1] FORGED\n[db2] \x1b]0;title\x07\x1b[2J\x9b31m\tend"
    shown = printable(forged)
    assert shown == "harmless\\r[db1] FORGED\\n[db2] \\x1b]0;title\\x07\\x1b[2J\\x9b31m\tend"
    assert not any(ord(c) < 32 and c != "\t" for c in shown)


def test_records_show_as_a_table_with_flat_lists_joined():
    mounts = [{"mountpoint": "/", "fstype": "ext4", "options": ["rw", "relatime"]},
              {"mountpoint": "/boot", "fstype": "vfat", "options": ["ro"]}]
    assert value_lines("mounts", mounts, "    ") == [
        "    mounts",
        "        mountpoint  fstype  options",
        "        /           ext4    rw,relatime",
        "        /boot       vfat    ro",
    ]


def test_short_values_inline_nested_ones_indented():
    assert value_lines("uptime", 12.5, "", 8) == ["uptime    12.5"]
    assert value_lines("os", {"id": "debian", "version": {"major": 12, "minor": 4}}) == [
        'os  {"id": "debian", "version": {"major": 12, "minor": 4}}']
    big = {"name": "x" * 80, "evil": "a\x1b[31mb"}
    assert value_lines("fact", big) == ["fact", "    name  " + "x" * 80, "    evil  a\\x1b[31mb"]


def test_a_remote_string_cannot_break_the_line():
    assert value_lines("hostname", "web1\n[db1] ok") == ["hostname  web1\\n[db1] ok"]


def test_a_message_block_keeps_its_lines_under_its_label():
    message = 'could not connect: denied\n  sudo: a password is required\n'
    assert 'FAILED: ' + printable_block(message, '    ') == (
        'FAILED: could not connect: denied\n      sudo: a password is required')
    # Each line is still escaped: a host's \r or escape sequence cannot
    # return to the start of a line and forge another host's.
    forged = printable_block('ok\r[db1] FORGED\n\x1b[2Jcleared\x9b', '  ')
    assert forged == 'ok\\r[db1] FORGED\n  \\x1b[2Jcleared\\x9b'
    assert printable_block('one line', '  ') == 'one line'
