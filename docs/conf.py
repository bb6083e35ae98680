"""Sphinx configuration for the chopsticks documentation.

Built offline (no intersphinx: CI has no network) and with warnings as errors:
``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""
import glob
import importlib
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, ROOT)  # the checkout, even when chopsticks is not installed in editable mode
# The bundled plugins' packages, whose tasks and facts the reference documents,
# so that `pip install -e '.[docs]'` is all a fresh checkout needs to build.
for _src in sorted(glob.glob(os.path.join(ROOT, 'plugins', '*', 'src'))):
    sys.path.insert(1, _src)

import chopsticks  # noqa: E402

project = 'chopsticks'
author = 'the chopsticks developers'
copyright = '2017-2026, the chopsticks developers'
release = chopsticks.__version__
version = '.'.join(release.split('.')[:2])

extensions = [
    'sphinx.ext.autodoc',
    'sphinx_click',
]

exclude_patterns = ['_build', 'CONTRACTS.md', 'plugin-example', 'Thumbs.db', '.DS_Store']
templates_path = []
root_doc = 'index'
default_role = 'code'          # `x` reads as code, never as a failed cross-reference
highlight_language = 'python3'
smartquotes = False            # -- and ' in command lines stay as typed
nitpicky = False                # annotations name third-party types Sphinx cannot resolve offline

autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
# An override says what it does differently; the base class's text (say,
# concurrent.futures.Future.result's) belongs to the base class's own docs.
autodoc_inherit_docstrings = False
autodoc_default_options = {
    'members': True,
    'show-inheritance': True,
    'undoc-members': True,
}
# The host-side plugin modules import nothing unusual; nothing needs mocking.
autodoc_mock_imports = []

html_theme = 'furo'
html_title = 'chopsticks %s' % release
html_static_path = []
html_show_sourcelink = False


def _drop_module_docstrings(app, what, name, obj, options, lines):
    # A module's docstring is written for the people who change the module
    # (how it works, why); the reference pages say what a user needs instead.
    if what == 'module':
        del lines[:]


def _resolve_reexports(app, env, node, contnode):
    # Pages name things as users import them (chopsticks.Group); the reference
    # documents each where it is defined (chopsticks.group.Group).
    target = node.get('reftarget', '')
    if node.get('refdomain') != 'py' or not target.startswith('chopsticks.'):
        return None
    module_name, _, name = target.rpartition('.')
    try:
        module = importlib.import_module(module_name)
        obj = getattr(module, name)
    except (ImportError, AttributeError):
        return None
    home = getattr(obj, '__module__', None)
    if not home or home == module_name:
        return None
    node = node.deepcopy()
    node['reftarget'] = '%s.%s' % (home, name)
    domain = env.get_domain('py')
    return domain.resolve_xref(env, node['refdoc'], app.builder, node['reftype'],
                               node['reftarget'], node, contnode)


def _init_signature(app, what, name, obj, options, signature, return_annotation):
    # BaseTunnel.__new__(cls, *args, **kwargs) records how to rebuild a tunnel
    # on a relay; autodoc would show its catch-all signature for every tunnel.
    if what == 'class' and signature == '(*args, **kwargs)' and '__init__' in dir(obj):
        import inspect
        try:
            sig = inspect.signature(obj.__init__)
        except (TypeError, ValueError):
            return None
        params = list(sig.parameters.values())[1:]  # without self
        return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty)), None
    return None


def setup(app):
    app.connect('autodoc-process-signature', _init_signature)
    app.connect('autodoc-process-docstring', _drop_module_docstrings)
    app.connect('missing-reference', _resolve_reexports)
