"""The table: medians, ratios to the floor or the best peer, and the targets."""
from .rows import COLUMNS, OURS, ROW_BY_ID, label


def fmt(value, unit):
    if value is None:
        return '?'
    if unit == 's':
        if value < 1e-3:
            return '%.0f µs' % (value * 1e6)
        if value < 0.01:
            return '%.2f ms' % (value * 1e3)
        if value < 0.9995:
            return '%.0f ms' % (value * 1e3)
        return '%.2f s' % value
    if unit == 'MB/s':
        return '%.0f MB/s' % value
    if unit == 'calls/s':
        return '{:,.0f}/s'.format(value)
    if unit == 'MB':
        return '%.1f kB' % (value * 1e3) if value < 0.1 else '%.2f MB' % value
    return '%g %s' % (value, unit)


def median_of(cell):
    return cell.get('median') if cell else None


def best_peer(row, cells):
    values = [median_of(cells.get(c.id)) for c in COLUMNS if c.peer]
    values = [v for v in values if v is not None]
    if not values:
        return None
    return max(values) if row.higher_is_better else min(values)


def reference(row, cells, which):
    if which is None:
        return None
    if which == 'best_peer':
        return best_peer(row, cells)
    return median_of(cells.get(which))


def target_met(row, cells, column_id):
    """True, False, or None when a reference is missing."""
    value = median_of(cells.get(column_id))
    if value is not None and row.id == 'thousand_connect':
        return _failed(cells[column_id]) == 0  # its target: none failing
    if value is None or not row.targets:
        return None
    for ref, factor in row.targets:
        bound = factor if ref == 'abs' else reference(row, cells, ref)
        if bound is None:
            return None
        if ref != 'abs':
            bound *= factor
        ok = value >= bound if row.higher_is_better else value <= bound
        if ref not in ('abs', 'floor', 'best_peer') and row.higher_is_better:
            ok = value > bound  # "ahead of" a named peer
        if not ok:
            return False
    if row.id == 'memory':
        extra = cells[column_id].get('extra', {})
        if extra.get('threads_added', 0) >= 0.5 * extra.get('tunnels', 1):
            return False
    return True


def cell_text(row, cells, column_id):
    cell = cells.get(column_id)
    if cell is None:
        return '—'
    if 'na' in cell:
        return 'n/a'
    if 'error' in cell:
        return 'error'
    text = fmt(cell['median'], row.unit)
    extra = cell.get('extra') or {}
    if row.id == 'memory':
        text += ', +%d threads' % extra.get('threads_added', 0)
    elif row.id == 'thousand_connect':
        text += ', %d failed' % _failed(cell)
    elif row.id == 'reconnect' and extra.get('cold (first tunnel)'):
        # Only the first turn's is cold: its control master outlives the turn
        # (ControlPersist) and serves the "cold" tunnel of the later turns.
        text += ' (cold %s)' % fmt(extra['cold (first tunnel)'][0], 's')
    elif column_id == 'floor' and extra:
        text += ' (%s)' % ', '.join('%s %s' % (k, fmt(_median(v), row.unit))
                                   for k, v in extra.items() if k != 'failed rounds')
    ref = reference(row, cells, row.ref)
    if ref and column_id != row.ref:
        text += ' ×%.2f' % (cell['median'] / ref)
    return text


def _failed(cell):
    failed = (cell.get('extra') or {}).get('failed', 0)
    return max(failed) if isinstance(failed, list) else failed


def _median(values):
    import statistics
    return statistics.median(values)


def table(results, settings):
    """A markdown table (readable in a terminal too)."""
    return table_of([(row_id, cells, settings) for row_id, cells in results.items()])


def table_of(entries):
    """The markdown table of ``(row_id, cells, settings)`` entries, which may
    come from different runs (each row labelled with its own run's sizes)."""
    # A column with no cell in any row shown (the deployment tools in a run
    # without the deployment rows, and the other way round) is left out.
    columns = [c for c in COLUMNS if any(cells.get(c.id) for _, cells, _ in entries)]
    titles = [c.title for c in columns]
    head = ['metric'] + titles + ['target', 'met (openssh / paramiko)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for row_id, cells, settings in entries:
        row = ROW_BY_ID[row_id]
        cols = [cell_text(row, cells, c.id) for c in columns]
        met = []
        for column_id in OURS:
            ok = target_met(row, cells, column_id)
            met.append({True: 'yes', False: 'no', None: '—'}[ok])
        if row.transport_free:
            met = met[:1]
        lines.append('| ' + ' | '.join([label(row, settings)] + cols + [row.target_text or '—', ' / '.join(met)])
                     + ' |')
    return '\n'.join(lines)


def notes(results, settings):
    """One line per row: how each column measured it, n/a reasons and errors."""
    titles = {c.id: c.title for c in COLUMNS}
    out = []
    for row_id, cells in results.items():
        parts = []
        for column_id, cell in cells.items():
            if not cell:
                continue
            if 'na' in cell:
                parts.append('%s n/a: %s' % (titles[column_id], cell['na']))
            elif 'error' in cell:
                parts.append('%s ERROR: %s' % (titles[column_id], cell['error']))
            else:
                failed = (cell.get('extra') or {}).get('failed rounds')
                if cell.get('note') or failed:
                    parts.append('%s: %s%s' % (titles[column_id], cell.get('note', ''), ' (%d of the rounds failed: %s)' % (
                        len(failed), failed[0]) if failed else ''))
        if parts:
            out.append('- %s: %s' % (label(ROW_BY_ID[row_id], settings), '; '.join(parts)))
    return '\n'.join(out)


def rst_table(markdown, caption):
    """The markdown ``table`` as a reStructuredText list-table, for the docs
    and the README (both show the last full run)."""
    rows = [[cell.strip() for cell in line.strip().strip('|').split('|')]
            for line in markdown.splitlines() if line.startswith('|') and '---|' not in line]
    out = ['.. list-table:: %s' % caption, '   :header-rows: 1', '   :stub-columns: 1', '']
    for row in rows:
        out.append('   * - %s' % (row[0] or ' '))
        out.extend('     - %s' % (cell or ' ') for cell in row[1:])
    return '\n'.join(out)


def main(argv=None):
    """``python -m bench.report RUN.json... [--rst]``: saved runs' tables again,
    the engine's rows in one table and the whole deployments in another."""
    import argparse
    import json
    p = argparse.ArgumentParser(prog='python -m bench.report', description=main.__doc__)
    p.add_argument('json', nargs='+', help='files written by python -m bench --json')
    p.add_argument('--rst', action='store_true', help='as reStructuredText list-tables')
    args = p.parse_args(argv)
    runs = []
    for path in args.json:
        with open(path) as f:
            runs.append(json.load(f))
    entries = [(row_id, row['columns'], run['settings'])
               for run in runs for row_id, row in run['rows'].items()]
    for title, rows in (('the engine', [e for e in entries if not ROW_BY_ID[e[0]].columns]),
                        ('whole deployments', [e for e in entries if ROW_BY_ID[e[0]].columns])):
        if not rows:
            continue
        markdown = table_of(rows)
        print(rst_table(markdown, 'python -m bench: %s' % title) if args.rst else markdown)
        print()
    for run in runs:
        print('%s (%.0f s, commit %s) on %s; %s' % (run['command'], run['seconds'], run['commit'],
                                                   run['machine'], run['load']))


if __name__ == '__main__':
    main()
