// hessmlp._C._fingerprint: the walk of hessmlp/_spec.py's _fingerprint over a model's modules
// in C (the Python walk cost more than the op itself on small networks). It builds the same
// information, in the same order, from each module's __dict__; values that are not plain
// (bool, int, str, None, float) go to the Python function frozen, a class's attributes to
// class_attrs. Returns None when it meets a TorchScript module (the Python walk then raises
// the error that names it).
#include <Python.h>

#include <cmath>

namespace {

// A new reference, or null with the Python error set.
PyObject* module_key(PyObject* m, PyObject* skip, PyObject* frozen, PyObject* class_attrs,
                     PyObject* todo);

struct Ref {  // owns one reference
  PyObject* p;
  explicit Ref(PyObject* q = nullptr) : p(q) {}
  ~Ref() { Py_XDECREF(p); }
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  PyObject* release() {
    PyObject* q = p;
    p = nullptr;
    return q;
  }
};

// The value's stand-in: plain values themselves (NaN as the string "nan"), else frozen(v).
PyObject* plain_or_frozen(PyObject* v, PyObject* frozen) {
  PyTypeObject* t = Py_TYPE(v);
  if (v == Py_None || t == &PyBool_Type || t == &PyLong_Type || t == &PyUnicode_Type) {
    Py_INCREF(v);
    return v;
  }
  if (t == &PyFloat_Type) {
    if (std::isnan(PyFloat_AsDouble(v))) return PyUnicode_FromString("nan");
    Py_INCREF(v);
    return v;
  }
  return PyObject_CallFunctionObjArgs(frozen, v, nullptr);
}

// (k, value) pairs of a dict's items, value = fn(item); fn returns a new reference or null.
template <typename Fn>
PyObject* items_tuple(PyObject* dict, PyObject* skip, Fn&& fn) {
  Ref list(PyList_New(0));
  if (!list.p) return nullptr;
  Py_ssize_t pos = 0;
  PyObject *k, *v;
  while (PyDict_Next(dict, &pos, &k, &v)) {
    if (skip) {
      const int in = PySet_Contains(skip, k);
      if (in < 0) return nullptr;
      if (in) continue;
    }
    Ref val(fn(v));
    if (!val.p) return nullptr;
    Ref pair(PyTuple_Pack(2, k, val.p));
    if (!pair.p || PyList_Append(list.p, pair.p) < 0) return nullptr;
  }
  return PyList_AsTuple(list.p);
}

PyObject* id_of(PyObject* o) { return PyLong_FromVoidPtr(o); }

// A parameter's stand-in: None, (id, None) when it requires grad, else (id, version).
PyObject* param_key(PyObject* p) {
  if (p == Py_None) {
    Py_INCREF(Py_None);
    return Py_None;
  }
  Ref rg(PyObject_GetAttrString(p, "requires_grad"));
  if (!rg.p) return nullptr;
  const int grad = PyObject_IsTrue(rg.p);
  if (grad < 0) return nullptr;
  Ref id(id_of(p));
  if (grad) return PyTuple_Pack(2, id.p, Py_None);
  Ref ver(PyObject_GetAttrString(p, "_version"));
  if (!ver.p) return nullptr;
  return PyTuple_Pack(2, id.p, ver.p);
}

PyObject* buffer_key(PyObject* b) {
  if (b == Py_None) {
    Py_INCREF(Py_None);
    return Py_None;
  }
  Ref id(id_of(b));
  Ref ver(PyObject_GetAttrString(b, "_version"));
  if (!ver.p) return nullptr;
  return PyTuple_Pack(2, id.p, ver.p);
}

// The ids of a hooks dict's values, as a tuple.
PyObject* hook_ids(PyObject* hooks) {
  Ref list(PyList_New(0));
  if (!list.p) return nullptr;
  Py_ssize_t pos = 0;
  PyObject *k, *v;
  while (PyDict_Next(hooks, &pos, &k, &v)) {
    Ref id(id_of(v));
    if (!id.p || PyList_Append(list.p, id.p) < 0) return nullptr;
  }
  return PyList_AsTuple(list.p);
}

PyObject* dict_item(PyObject* d, const char* name) {
  PyObject* v = PyDict_GetItemString(d, name);  // borrowed
  if (!v) PyErr_Format(PyExc_AttributeError, "hessmlp: a module without %s", name);
  return v;
}

PyObject* module_key(PyObject* m, PyObject* skip, PyObject* frozen, PyObject* class_attrs,
                     PyObject* todo) {
  Ref d(PyObject_GetAttrString(m, "__dict__"));
  if (!d.p) return nullptr;
  if (!PyDict_Check(d.p)) {
    PyErr_SetString(PyExc_TypeError, "hessmlp: a module's __dict__ is not a dict");
    return nullptr;
  }
  PyObject *params = dict_item(d.p, "_parameters"), *buffers = dict_item(d.p, "_buffers");
  PyObject *pre = dict_item(d.p, "_forward_pre_hooks"), *post = dict_item(d.p, "_forward_hooks");
  PyObject* children = dict_item(d.p, "_modules");
  PyObject* training = dict_item(d.p, "training");
  if (!params || !buffers || !pre || !post || !children || !training) return nullptr;
  if (!PyDict_Check(params) || !PyDict_Check(buffers) || !PyDict_Check(pre) ||
      !PyDict_Check(post) || !PyDict_Check(children)) {
    PyErr_SetString(PyExc_TypeError, "hessmlp: a module's bookkeeping is not made of dicts");
    return nullptr;
  }
  Ref attrs(items_tuple(d.p, skip, [&](PyObject* v) { return plain_or_frozen(v, frozen); }));
  if (!attrs.p) return nullptr;
  Ref ps(items_tuple(params, nullptr, param_key));
  if (!ps.p) return nullptr;
  Ref bs(items_tuple(buffers, nullptr, buffer_key));
  if (!bs.p) return nullptr;
  Ref h0(hook_ids(pre)), h1(hook_ids(post));
  if (!h0.p || !h1.p) return nullptr;
  Ref hooks(PyTuple_Pack(2, h0.p, h1.p));
  Ref names(PySequence_Tuple(children));
  if (!hooks.p || !names.p) return nullptr;
  PyObject* cls = reinterpret_cast<PyObject*>(Py_TYPE(m));
  Ref cattrs(PyObject_CallFunctionObjArgs(class_attrs, cls, nullptr));
  Ref id(id_of(m));
  if (!cattrs.p || !id.p) return nullptr;
  Py_ssize_t pos = 0;
  PyObject *k, *c;
  while (PyDict_Next(children, &pos, &k, &c)) {
    if (c != Py_None && PyList_Append(todo, c) < 0) return nullptr;
  }
  return PyTuple_Pack(9, id.p, cls, cattrs.p, training, attrs.p, ps.p, bs.p, hooks.p, names.p);
}

PyObject* fingerprint(PyObject*, PyObject* args) {
  PyObject *model, *skip, *frozen, *class_attrs, *script_type;
  if (!PyArg_ParseTuple(args, "OOOOO", &model, &skip, &frozen, &class_attrs, &script_type)) {
    return nullptr;
  }
  Ref out(PyList_New(0)), todo(PyList_New(0));
  if (!out.p || !todo.p || PyList_Append(todo.p, model) < 0) return nullptr;
  Py_ssize_t n;
  while ((n = PyList_Size(todo.p)) > 0) {
    Ref m(PyList_GetItem(todo.p, n - 1));  // (borrowed: take a reference before the slice)
    Py_XINCREF(m.p);
    if (!m.p || PyList_SetSlice(todo.p, n - 1, n, nullptr) < 0) return nullptr;
    const int scripted = PyObject_IsInstance(m.p, script_type);
    if (scripted < 0) return nullptr;
    if (scripted) Py_RETURN_NONE;
    Ref key(module_key(m.p, skip, frozen, class_attrs, todo.p));
    if (!key.p || PyList_Append(out.p, key.p) < 0) return nullptr;
  }
  return PyList_AsTuple(out.p);
}

// ---- the same walk, compared with a key it made before: no objects built while they agree

// 1 where v's stand-in equals stored, 0 where not, -1 on an error.
int same_value(PyObject* v, PyObject* stored, PyObject* frozen) {
  PyTypeObject* t = Py_TYPE(v);
  if (v == Py_None || t == &PyBool_Type || t == &PyLong_Type || t == &PyUnicode_Type) {
    return PyObject_RichCompareBool(v, stored, Py_EQ);
  }
  if (t == &PyFloat_Type && std::isnan(PyFloat_AsDouble(v))) {
    return PyUnicode_Check(stored) && PyUnicode_CompareWithASCIIString(stored, "nan") == 0;
  }
  if (t == &PyFloat_Type) return PyObject_RichCompareBool(v, stored, Py_EQ);
  Ref f(PyObject_CallFunctionObjArgs(frozen, v, nullptr));
  if (!f.p) return -1;
  return PyObject_RichCompareBool(f.p, stored, Py_EQ);
}

bool is_tuple_of(PyObject* t, Py_ssize_t n) { return PyTuple_Check(t) && PyTuple_Size(t) == n; }

bool same_id(PyObject* stored, PyObject* o) {
  return PyLong_Check(stored) && PyLong_AsVoidPtr(stored) == static_cast<void*>(o);
}

// A tensor's stand-in against stored: (id, None) when it requires grad (grad_marker), else
// (id, version); None for None.
int same_tensor(PyObject* p, PyObject* stored, bool grad_marker) {
  if (p == Py_None) return stored == Py_None;
  if (!is_tuple_of(stored, 2) || !same_id(PyTuple_GetItem(stored, 0), p)) return 0;
  PyObject* second = PyTuple_GetItem(stored, 1);
  if (grad_marker) {
    Ref rg(PyObject_GetAttrString(p, "requires_grad"));
    if (!rg.p) return -1;
    const int grad = PyObject_IsTrue(rg.p);
    if (grad < 0) return -1;
    if (grad) return second == Py_None;
    if (second == Py_None) return 0;
  }
  Ref ver(PyObject_GetAttrString(p, "_version"));
  if (!ver.p) return -1;
  return PyObject_RichCompareBool(ver.p, second, Py_EQ);
}

// dict's items (keys not in skip) against stored pairs (k, stand-in): same(v, stored_value).
template <typename Same>
int same_items(PyObject* dict, PyObject* skip, PyObject* stored, Same&& same) {
  if (!PyTuple_Check(stored)) return 0;
  const Py_ssize_t n = PyTuple_Size(stored);
  Py_ssize_t pos = 0, i = 0;
  PyObject *k, *v;
  while (PyDict_Next(dict, &pos, &k, &v)) {
    if (skip) {
      const int in = PySet_Contains(skip, k);
      if (in < 0) return -1;
      if (in) continue;
    }
    if (i >= n) return 0;
    PyObject* pair = PyTuple_GetItem(stored, i++);
    if (!is_tuple_of(pair, 2)) return 0;
    int r = PyObject_RichCompareBool(k, PyTuple_GetItem(pair, 0), Py_EQ);
    if (r <= 0) return r;
    r = same(v, PyTuple_GetItem(pair, 1));
    if (r <= 0) return r;
  }
  return i == n;
}

int same_hooks(PyObject* hooks, PyObject* stored) {
  if (!PyTuple_Check(stored) || PyTuple_Size(stored) != PyDict_Size(hooks)) return 0;
  Py_ssize_t pos = 0, i = 0;
  PyObject *k, *v;
  while (PyDict_Next(hooks, &pos, &k, &v)) {
    if (!same_id(PyTuple_GetItem(stored, i++), v)) return 0;
  }
  return 1;
}

int module_matches(PyObject* m, PyObject* stored, PyObject* skip, PyObject* frozen,
                   PyObject* class_attrs, PyObject* todo) {
  if (!is_tuple_of(stored, 9) || !same_id(PyTuple_GetItem(stored, 0), m)) return 0;
  PyObject* cls = reinterpret_cast<PyObject*>(Py_TYPE(m));
  if (PyTuple_GetItem(stored, 1) != cls) return 0;
  Ref d(PyObject_GetAttrString(m, "__dict__"));
  if (!d.p) return -1;
  if (!PyDict_Check(d.p)) return 0;
  PyObject *params = PyDict_GetItemString(d.p, "_parameters");
  PyObject *buffers = PyDict_GetItemString(d.p, "_buffers");
  PyObject *pre = PyDict_GetItemString(d.p, "_forward_pre_hooks");
  PyObject *post = PyDict_GetItemString(d.p, "_forward_hooks");
  PyObject *children = PyDict_GetItemString(d.p, "_modules");
  PyObject *training = PyDict_GetItemString(d.p, "training");
  if (!params || !buffers || !pre || !post || !children || !training || !PyDict_Check(params) ||
      !PyDict_Check(buffers) || !PyDict_Check(pre) || !PyDict_Check(post) ||
      !PyDict_Check(children)) {
    return 0;  // (the full walk says what is wrong)
  }
  int r = PyObject_RichCompareBool(training, PyTuple_GetItem(stored, 3), Py_EQ);
  if (r <= 0) return r;
  {
    Ref ca(PyObject_CallFunctionObjArgs(class_attrs, cls, nullptr));
    if (!ca.p) return -1;
    r = PyObject_RichCompareBool(ca.p, PyTuple_GetItem(stored, 2), Py_EQ);
    if (r <= 0) return r;
  }
  r = same_items(d.p, skip, PyTuple_GetItem(stored, 4),
                 [&](PyObject* v, PyObject* s) { return same_value(v, s, frozen); });
  if (r <= 0) return r;
  r = same_items(params, nullptr, PyTuple_GetItem(stored, 5),
                 [](PyObject* v, PyObject* s) { return same_tensor(v, s, true); });
  if (r <= 0) return r;
  r = same_items(buffers, nullptr, PyTuple_GetItem(stored, 6),
                 [](PyObject* v, PyObject* s) { return same_tensor(v, s, false); });
  if (r <= 0) return r;
  PyObject* hooks = PyTuple_GetItem(stored, 7);
  if (!is_tuple_of(hooks, 2) || !same_hooks(pre, PyTuple_GetItem(hooks, 0)) ||
      !same_hooks(post, PyTuple_GetItem(hooks, 1))) {
    return 0;
  }
  PyObject* names = PyTuple_GetItem(stored, 8);
  if (!PyTuple_Check(names) || PyTuple_Size(names) != PyDict_Size(children)) return 0;
  Py_ssize_t pos = 0, i = 0;
  PyObject *k, *c;
  while (PyDict_Next(children, &pos, &k, &c)) {
    r = PyObject_RichCompareBool(k, PyTuple_GetItem(names, i++), Py_EQ);
    if (r <= 0) return r;
    if (c != Py_None && PyList_Append(todo, c) < 0) return -1;
  }
  return 1;
}

PyObject* fingerprint_matches(PyObject*, PyObject* args) {
  PyObject *model, *key, *skip, *frozen, *class_attrs, *script_type;
  if (!PyArg_ParseTuple(args, "OOOOOO", &model, &key, &skip, &frozen, &class_attrs,
                        &script_type)) {
    return nullptr;
  }
  if (!PyTuple_Check(key)) Py_RETURN_FALSE;
  const Py_ssize_t n_key = PyTuple_Size(key);
  Ref todo(PyList_New(0));
  if (!todo.p || PyList_Append(todo.p, model) < 0) return nullptr;
  Py_ssize_t n, seen = 0;
  while ((n = PyList_Size(todo.p)) > 0) {
    Ref m(PyList_GetItem(todo.p, n - 1));
    Py_XINCREF(m.p);
    if (!m.p || PyList_SetSlice(todo.p, n - 1, n, nullptr) < 0) return nullptr;
    const int scripted = PyObject_IsInstance(m.p, script_type);
    if (scripted < 0) return nullptr;
    if (scripted || seen >= n_key) Py_RETURN_FALSE;
    const int r = module_matches(m.p, PyTuple_GetItem(key, seen++), skip, frozen, class_attrs,
                                 todo.p);
    if (r < 0) return nullptr;
    if (r == 0) Py_RETURN_FALSE;
  }
  if (seen != n_key) Py_RETURN_FALSE;
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"_fingerprint_matches", fingerprint_matches, METH_VARARGS,
     "_fingerprint_matches(model, key, skip, frozen, class_attrs, script_type): whether "
     "_fingerprint(model) == key, without building the fingerprint while they agree."},
    {"_fingerprint", fingerprint, METH_VARARGS,
     "_fingerprint(model, skip, frozen, class_attrs, script_type): hessmlp/_spec.py's "
     "_fingerprint walk (None at a TorchScript module)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// The methods of the module hessmlp._C (csrc/ops.cpp).
PyMethodDef* hessmlp_python_methods() { return methods; }
