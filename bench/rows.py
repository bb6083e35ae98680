"""What the benchmark measures: the columns, the tasks and the rows of the table.

A *row* is one metric. A *task* is one subprocess run of a column's script
(``bench/peers/<script>.py TASK``) and may fill several rows from one set-up.
To add a row: add a ``Row`` here, then a function named after its task in
each script that can measure it (returning a ``Result`` or a dict of them).
"""
from dataclasses import dataclass, field
from typing import Optional, Tuple


@dataclass(frozen=True)
class Column:
    id: str
    title: str
    script: str
    venv: bool = False        # runs in bench/.env-peers, not the project's interpreter
    options: dict = field(default_factory=dict)
    peer: bool = False        # counts for "best peer"
    dedicated: bool = False   # measures only the rows that name it in Row.columns


COLUMNS = (
    Column('floor', 'floor', 'floor.py'),
    Column('ours-openssh', 'ours (openssh)', 'ours.py', options={'transport': 'openssh'}),
    Column('ours-paramiko', 'ours (paramiko)', 'ours.py', options={'transport': 'paramiko'}),
    Column('chopsticks-1.0', 'chopsticks 1.0', 'peer_chopsticks1.py', venv=True, peer=True),
    Column('execnet', 'execnet', 'peer_execnet.py', venv=True, peer=True),
    Column('mitogen', 'mitogen', 'peer_mitogen.py', venv=True, peer=True),
    Column('fabric', 'fabric', 'peer_fabric.py', venv=True),
    # The whole-deployment rows only: the same five steps written by hand with
    # the standard library and sent the same way (the floor of those rows),
    # and the two configuration-management tools.
    Column('hand-written', 'hand-written function', 'ours.py', dedicated=True,
           options={'transport': 'openssh', 'deploy': 'hand'}),
    Column('pyinfra', 'pyinfra', 'peer_pyinfra.py', venv=True, peer=True, dedicated=True),
    Column('ansible', 'Ansible', 'peer_ansible.py', venv=True, peer=True, dedicated=True),
)
OURS = ('ours-openssh', 'ours-paramiko')


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    unit: str                 # 's', 'MB/s', 'calls/s', 'MB'
    task: str
    higher_is_better: bool = False
    # The reference each cell's ratio is taken to: 'floor', 'best_peer', a column id, or None.
    ref: Optional[str] = 'floor'
    # (reference, factor): ours must be <= factor x reference (>= when higher is better).
    # reference is 'floor', 'best_peer', a column id, or 'abs' (factor is then the value).
    targets: Tuple[Tuple[str, float], ...] = ()
    target_text: str = ''
    transport_free: bool = False  # Local rows: the paramiko column has nothing to add
    columns: Tuple[str, ...] = ()  # the columns that measure this row; () for all but dedicated ones


ROWS = (
    Row('connect_call', 'connect + first call', 's', 'connect_call',
        targets=(('floor', 1.05),), target_text='<= 1.05x floor'),
    Row('reconnect', 'reconnect to a connected host + call', 's', 'reconnect',
        target_text='(vs cold connect)'),
    Row('trivial_rtt', 'trivial call round trip', 's', 'trivial_rtt',
        targets=(('floor', 1.5),), target_text='<= 1.5x floor'),
    Row('pipelined', 'pipelined calls, one tunnel', 'calls/s', 'pipelined',
        higher_is_better=True, ref='execnet',
        targets=(('abs', 40000), ('execnet', 1.0)), target_text='>= 40,000/s and > execnet'),
    Row('fresh_rtt', 'a fresh script: connect, then 1,000 len calls', 's', 'fresh_rtt',
        targets=(('floor', 1.5),), target_text='<= 1.5x floor'),
    Row('asyncio_gather', 'asyncio.gather of 2,000 acalls, one tunnel', 'calls/s',
        'asyncio_gather', higher_is_better=True, ref='execnet', targets=(('execnet', 1.0),),
        target_text='> execnet, >= 0.8x call_async (note)'),
    Row('echo_4mib', '4 MiB bytes echoed (both ways counted)', 'MB/s', 'echo_4mib',
        higher_is_better=True, targets=(('floor', 0.75),), target_text='>= 0.75x floor'),
    Row('put', 'put {file_mib} MiB', 'MB/s', 'files',
        higher_is_better=True, targets=(('floor', 0.9),), target_text='>= 0.9x ssh cat'),
    Row('fetch', 'fetch {file_mib} MiB', 'MB/s', 'files',
        higher_is_better=True, targets=(('floor', 0.9),), target_text='>= 0.9x ssh cat'),
    Row('wan_import', 'import ~200 modules the host lacks, WAN', 's', 'wan',
        ref='best_peer', targets=(('abs', 0.4),), target_text='<= 0.4 s'),
    Row('wan_import_real', 'import ~200 modules of real PyPI packages the host lacks, WAN', 's',
        'wan_real', ref='best_peer', targets=(('abs', 0.4),),
        target_text='<= 0.4 s, <= 3 round trips'),
    Row('wan_connect', 'connect + first call, WAN', 's', 'wan'),
    Row('wan_rtt', 'trivial call round trip, WAN', 's', 'wan'),
    Row('many_connect', 'connect + call on {hosts} hosts at once', 's', 'many_hosts',
        targets=(('floor', 1.15),), target_text='<= 1.15x floor'),
    Row('many_call', 'one call to {hosts} connected hosts', 's', 'many_hosts',
        ref='best_peer', targets=(('best_peer', 0.5),), target_text='<= 0.5x best peer'),
    Row('local_connect', 'Local tunnel: connect + first call', 's', 'local_connect',
        targets=(('abs', 0.025),), target_text='<= 25 ms', transport_free=True),
    Row('thousand_connect', 'Local: connect + first call on {thousand} hosts', 's',
        'thousand', ref=None, target_text='none failing', transport_free=True),
    Row('thousand_call', 'Local: one call to {thousand} connected hosts', 's', 'thousand', ref=None,
        targets=(('abs', 0.1),), target_text='<= 100 ms', transport_free=True),
    Row('thousand_memory', 'controller memory per connected Local host ({thousand})', 'MB',
        'thousand', ref=None, transport_free=True),
    Row('memory', 'controller memory per idle Local tunnel ({tunnels})', 'MB', 'memory', ref=None,
        targets=(('abs', 2.0),), target_text='<= 2 MB, no thread per tunnel',
        transport_free=True),
)

# A deployment of five operations (bench/peers/deploy_fns.py): a directory, a
# file's content, a line in a file, a command and a package present, each
# host in its own directory.  Every column runs it from a fresh process, as
# its users would: first on hosts that have none of it, then again.
DEPLOY_COLUMNS = ('ours-openssh', 'hand-written', 'pyinfra', 'ansible')
_DEPLOY = dict(unit='s', ref='hand-written', columns=DEPLOY_COLUMNS, transport_free=True,
               targets=(('hand-written', 1.2), ('pyinfra', 0.3)),
               target_text='<= 1.2x hand-written and <= 0.3x pyinfra')
ROWS += (
    Row('deploy_first', 'deployment of 5 operations, {deploy_hosts} hosts, first run',
        task='deploy', **_DEPLOY),
    Row('deploy_second', 'deployment of 5 operations, {deploy_hosts} hosts, second run',
        task='deploy', **_DEPLOY),
    Row('deploy_first_many', 'deployment of 5 operations, {hosts} hosts, first run',
        task='deploy_many', **_DEPLOY),
    Row('deploy_second_many', 'deployment of 5 operations, {hosts} hosts, second run',
        task='deploy_many', **_DEPLOY),
)

ROW_BY_ID = {row.id: row for row in ROWS}


def measures(column, row):
    """Whether ``column`` has a cell in ``row``."""
    return column.id in row.columns if row.columns else not column.dedicated


def label(row, settings):
    """The row's label with this run's sizes filled in."""
    return row.label.format(file_mib=settings['file_size'] >> 20, hosts=settings['n_hosts'],
                            tunnels=settings['mem_tunnels'],
                            thousand='{:,}'.format(settings.get('thousand_hosts', 1000)),
                            deploy_hosts=settings.get('deploy_hosts', '?'))


def tasks_for(row_ids):
    """The tasks to run, in table order, for the selected rows."""
    tasks = []
    for row in ROWS:
        if row.id in row_ids and row.task not in tasks:
            tasks.append(row.task)
    return tasks
