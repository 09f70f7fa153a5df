"""The import graph of reco_jax runs one way: no cycle, counting imports inside functions."""
import ast
import pathlib

_ROOT = pathlib.Path(__file__).parents[1] / 'reco_jax'


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(_ROOT.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
  """{module: the reco_jax modules it imports anywhere in its source}."""
  paths = {_module_name(p): p for p in _ROOT.rglob('*.py')}
  graph = {}
  for name, path in paths.items():
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          up = package.split('.')[:len(package.split('.')) - node.level + 1]
          base = '.'.join(up + ([node.module] if node.module else []))
        found.update(f'{base}.{a.name}' if f'{base}.{a.name}' in paths else base
                     for a in node.names)
    graph[name] = {m for m in found if m in paths and m != name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while not component or component[-1] != v:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_checker_finds_a_cycle():
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert cycles({'a': {'b'}, 'b': set()}) == []


def test_reco_jax_imports_run_one_way():
  graph = import_graph()
  assert 'reco_jax.train' in graph['reco_jax.main']  # the graph sees function-level imports
  found = cycles(graph)
  assert not found, '\n'.join(
      ' <-> '.join(c) + ': ' + '; '.join(f'{m} imports {sorted(graph[m] & set(c))}' for m in c)
      for c in found)


def test_nothing_below_the_trainer_imports_it():
  users = sorted(m for m, deps in import_graph().items() if 'reco_jax.train' in deps)
  assert users == ['reco_jax.main'], users
