//! A container's env under edit. Every change is recorded as a JSON Patch operation whose index is
//! right at the moment it applies, so the operations replay in order on the pod's JSON.
//!
//! The pod's own items are borrowed, never copied; the planner's additions and replacements are
//! kept beside them. An item's current index comes from a Fenwick tree of the items alive at each
//! position, so an insert or a removal costs O(log n) instead of shifting a list, and a name is
//! found through a map instead of a scan: planning stays near linear in the env's length and the
//! number of references (a pod may carry tens of thousands of env items).

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::{Container, EnvVar};

use super::{JsonPatch, env_path, secret_var};
use crate::backends::KeyRef;
use crate::workload::Slot;

/// One env item: the pod's `n`-th, or the `n`-th the planner added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Item {
    Pod(usize),
    Added(usize),
}

/// Where an insertion goes: right before an item, or at the end of the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Anchor {
    Before(Item),
    End,
}

struct Added {
    var: EnvVar,
    /// Added items sit in the gap before pod item `gap` (`gap == pod.len()`: after the last one).
    gap: usize,
    /// Its place in the gap's list.
    place: usize,
    alive: bool,
}

/// The added items of one gap, in list order, with a count of the alive ones by place.
#[derive(Default)]
struct Gap {
    items: Vec<usize>,
    alive: Fenwick,
}

impl Gap {
    fn alive(&self) -> usize {
        self.alive.before(self.items.len())
    }
}

pub(super) struct EnvEditor<'a> {
    /// `spec`, `containers` or `initContainers`, the index.
    path: [String; 3],
    pod: &'a [EnvVar],
    /// Pod items the planner replaced or gave a new value.
    changed: HashMap<usize, EnvVar>,
    pod_removed: HashSet<usize>,
    added: Vec<Added>,
    /// The added items of each gap that has any.
    gaps: HashMap<usize, Gap>,
    /// Per gap `g`: pod item `g` (while alive) plus the alive added items in front of it.
    alive: Fenwick,
    pod_names: HashMap<&'a str, Vec<usize>>,
    added_names: HashMap<String, Vec<usize>>,
    /// Generated variables already declared, so each is looked up once.
    declared: HashSet<String>,
    present: bool,
    ops: &'a mut JsonPatch,
}

impl<'a> EnvEditor<'a> {
    pub(super) fn new(slot: Slot, container: &'a Container, ops: &'a mut JsonPatch) -> Self {
        let pod = container.env.as_deref().unwrap_or_default();
        let mut pod_names: HashMap<&str, Vec<usize>> = HashMap::with_capacity(pod.len());
        for (i, var) in pod.iter().enumerate() {
            pod_names.entry(var.name.as_str()).or_default().push(i);
        }
        Self {
            path: ["spec".into(), slot.field().into(), slot.index.to_string()],
            pod,
            changed: HashMap::new(),
            pod_removed: HashSet::new(),
            added: Vec::new(),
            gaps: HashMap::new(),
            alive: Fenwick::ones(pod.len(), pod.len() + 1),
            pod_names,
            added_names: HashMap::new(),
            declared: HashSet::new(),
            present: container.env.is_some(),
            ops,
        }
    }

    /// The pod's own items, by position (removed ones included: check [`Self::is_removed`]).
    pub(super) fn pod_len(&self) -> usize {
        self.pod.len()
    }

    pub(super) fn is_removed(&self, item: Item) -> bool {
        match item {
            Item::Pod(i) => self.pod_removed.contains(&i),
            Item::Added(k) => !self.added[k].alive,
        }
    }

    pub(super) fn get(&self, item: Item) -> &EnvVar {
        match item {
            Item::Pod(i) => self.changed.get(&i).unwrap_or(&self.pod[i]),
            Item::Added(k) => &self.added[k].var,
        }
    }

    fn len(&self) -> usize {
        self.alive.before(self.pod.len() + 1)
    }

    /// The item's index in the list as edited so far (for a removed pod item: where it was).
    fn index(&self, item: Item) -> usize {
        match item {
            Item::Pod(i) => self.alive.before(i) + self.gaps.get(&i).map_or(0, Gap::alive),
            Item::Added(k) => {
                let Added { gap, place, .. } = self.added[k];
                let in_gap = self.gaps.get(&gap).map_or(0, |g| g.alive.before(place));
                self.alive.before(gap) + in_gap
            }
        }
    }

    /// The alive items named `name`, in no particular order.
    fn alive_named(&self, name: &str) -> impl Iterator<Item = Item> + '_ {
        let pod = self
            .pod_names
            .get(name)
            .into_iter()
            .flatten()
            .map(|&i| Item::Pod(i));
        let added = self
            .added_names
            .get(name)
            .into_iter()
            .flatten()
            .map(|&k| Item::Added(k));
        pod.chain(added).filter(|&item| !self.is_removed(item))
    }

    /// Every alive item named `name`, in list order.
    pub(super) fn all_named(&self, name: &str) -> Vec<Item> {
        let mut items: Vec<(usize, Item)> = self
            .alive_named(name)
            .map(|item| (self.index(item), item))
            .collect();
        items.sort_unstable_by_key(|&(index, _)| index);
        items.into_iter().map(|(_, item)| item).collect()
    }

    /// The first alive item named `name`.
    pub(super) fn position(&self, name: &str) -> Option<Item> {
        self.alive_named(name).min_by_key(|&item| self.index(item))
    }

    fn comes_before(&self, item: Item, anchor: Anchor) -> bool {
        match anchor {
            Anchor::End => true,
            Anchor::Before(other) => self.index(item) < self.index(other),
        }
    }

    pub(super) fn insert(&mut self, at: Anchor, var: EnvVar) {
        let (gap, place) = match at {
            Anchor::End => (self.pod.len(), None),
            Anchor::Before(Item::Pod(i)) => (i, None),
            Anchor::Before(Item::Added(k)) => (self.added[k].gap, Some(k)),
        };
        let id = self.added.len();
        let list = self.gaps.entry(gap).or_default();
        let place = match place.map(|k| self.added[k].place) {
            // In front of another added item (not a case the planner has today): the places
            // behind it shift, and the gap's counts are rebuilt.
            Some(p) => {
                list.items.insert(p, id);
                for (q, &k) in list.items.iter().enumerate().skip(p + 1) {
                    self.added[k].place = q;
                }
                let counts: Vec<usize> = list
                    .items
                    .iter()
                    .map(|&k| usize::from(k == id || self.added[k].alive))
                    .collect();
                list.alive = Fenwick::from_counts(&counts);
                p
            }
            None => {
                list.items.push(id);
                list.alive.push(1);
                list.items.len() - 1
            }
        };
        self.added_names
            .entry(var.name.clone())
            .or_default()
            .push(id);
        self.added.push(Added {
            var,
            gap,
            place,
            alive: true,
        });
        self.alive.add(gap);
        let index = self.index(Item::Added(id));
        let last = at == Anchor::End || index + 1 == self.len();
        let var = &self.added[id].var;
        if !self.present {
            self.present = true;
            self.ops.add(env_path(&self.path, &[]), &[var]);
            return;
        }
        let token = if last {
            "-".to_owned()
        } else {
            index.to_string()
        };
        self.ops.add(env_path(&self.path, &[&token]), var);
    }

    pub(super) fn push(&mut self, var: EnvVar) {
        self.insert(Anchor::End, var);
    }

    pub(super) fn replace(&mut self, item: Item, var: EnvVar) {
        let index = self.index(item).to_string();
        self.ops.replace(env_path(&self.path, &[&index]), &var);
        self.store(item, var);
    }

    pub(super) fn set_value(&mut self, item: Item, value: String) {
        let index = self.index(item).to_string();
        self.ops
            .replace(env_path(&self.path, &[&index, "value"]), &value);
        let mut var = self.get(item).clone();
        var.value = Some(value);
        self.store(item, var);
    }

    fn store(&mut self, item: Item, var: EnvVar) {
        match item {
            Item::Pod(i) => {
                self.changed.insert(i, var);
            }
            Item::Added(k) => self.added[k].var = var,
        }
    }

    fn remove(&mut self, item: Item) {
        let index = self.index(item).to_string();
        self.ops.remove(env_path(&self.path, &[&index]));
        let gap = match item {
            Item::Pod(i) => {
                self.pod_removed.insert(i);
                i
            }
            Item::Added(k) => {
                let Added { gap, place, .. } = self.added[k];
                self.added[k].alive = false;
                if let Some(list) = self.gaps.get_mut(&gap) {
                    list.alive.sub(place);
                }
                gap
            }
        };
        self.alive.sub(gap);
    }

    /// Makes sure `name` is declared before `at` (the kubelet only expands `$(X)` from earlier
    /// vars). Generated names belong to the webhook: a pod's own variable of that name (or one
    /// declared too late to be expanded) is replaced by the webhook's, before its use.
    pub(super) fn declare_before(&mut self, at: Anchor, name: &str, key_ref: &KeyRef) {
        if !self.declared.insert(name.to_owned()) {
            return;
        }
        let desired = secret_var(name, key_ref);
        match self.position(name) {
            Some(item) if self.comes_before(item, at) => {
                if *self.get(item) != desired {
                    self.replace(item, desired);
                }
            }
            Some(item) => {
                self.remove(item);
                self.insert(at, desired);
            }
            None => self.insert(at, desired),
        }
    }

    /// The list as edited, for tests.
    #[cfg(test)]
    pub(super) fn current(&self) -> Vec<EnvVar> {
        let mut out = Vec::with_capacity(self.len());
        for gap in 0..=self.pod.len() {
            for &k in self
                .gaps
                .get(&gap)
                .map(|g| g.items.as_slice())
                .unwrap_or_default()
            {
                if self.added[k].alive {
                    out.push(self.added[k].var.clone());
                }
            }
            if gap < self.pod.len() && !self.is_removed(Item::Pod(gap)) {
                out.push(self.get(Item::Pod(gap)).clone());
            }
        }
        out
    }
}

/// Counts per slot with prefix sums in O(log n).
struct Fenwick {
    /// 1-based: `tree[i]` sums the slots `(i - lowbit(i), i]`; `tree[0]` is unused.
    tree: Vec<usize>,
}

impl Default for Fenwick {
    fn default() -> Self {
        Self { tree: vec![0] }
    }
}

impl Fenwick {
    /// Slots holding `counts`, built in linear time.
    fn from_counts(counts: &[usize]) -> Self {
        let mut tree = Vec::with_capacity(counts.len() + 1);
        tree.push(0);
        tree.extend_from_slice(counts);
        let slots = counts.len();
        for i in 1..=slots {
            let parent = i + (i & i.wrapping_neg());
            if parent <= slots {
                tree[parent] += tree[i];
            }
        }
        Self { tree }
    }

    /// Appends a slot holding `count`, in O(log n).
    fn push(&mut self, count: usize) {
        let i = self.tree.len();
        // `tree[i]` sums the slots `(i - lowbit(i), i]`: the new one and those before it.
        let from = i - (i & i.wrapping_neg());
        let sum = self.before(i - 1) - self.before(from);
        self.tree.push(count + sum);
    }

    /// `slots` slots, the first `ones` of them holding 1.
    fn ones(ones: usize, slots: usize) -> Self {
        let counts: Vec<usize> = (0..slots).map(|i| usize::from(i < ones)).collect();
        Self::from_counts(&counts)
    }

    fn add(&mut self, slot: usize) {
        let mut i = slot + 1;
        while i < self.tree.len() {
            self.tree[i] += 1;
            i += i & i.wrapping_neg();
        }
    }

    fn sub(&mut self, slot: usize) {
        let mut i = slot + 1;
        while i < self.tree.len() {
            self.tree[i] = self.tree[i].saturating_sub(1);
            i += i & i.wrapping_neg();
        }
    }

    /// Sum of the slots before `slot`.
    fn before(&self, slot: usize) -> usize {
        let mut i = slot.min(self.tree.len() - 1);
        let mut sum = 0;
        while i > 0 {
            sum += self.tree[i];
            i -= i & i.wrapping_neg();
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenwick_prefix_sums() {
        let mut f = Fenwick::ones(5, 6);
        assert_eq!(
            (0..=6).map(|s| f.before(s)).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5, 5]
        );
        f.add(5);
        f.add(2);
        f.sub(0);
        assert_eq!(
            (0..=6).map(|s| f.before(s)).collect::<Vec<_>>(),
            [0, 0, 1, 3, 4, 5, 6]
        );
        let mut grown = Fenwick::default();
        let counts = [1, 0, 2, 1, 1, 0, 3, 1, 1];
        for c in counts {
            grown.push(c);
        }
        let built = Fenwick::from_counts(&counts);
        for s in 0..=counts.len() {
            let sum: usize = counts[..s].iter().sum();
            assert_eq!((grown.before(s), built.before(s)), (sum, sum), "slot {s}");
        }
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    /// Random edits through the editor; its operations, applied to the pod's JSON, must give the
    /// list it reports, and every lookup must agree with a plain scan of that list.
    #[test]
    fn operations_replay_to_the_edited_list() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..200 {
            let len = next(12);
            let env: Vec<EnvVar> = (0..len)
                .map(|i| var(&format!("V{}", next(6)), &i.to_string()))
                .collect();
            let container = Container {
                name: "c".into(),
                env: (round % 7 != 0 || len > 0).then(|| env.clone()),
                ..Container::default()
            };
            let mut ops = JsonPatch::default();
            let slot = Slot {
                init: false,
                index: 0,
            };
            let mut editor = EnvEditor::new(slot, &container, &mut ops);
            for step in 0..next(10) {
                let name = format!("V{}", next(8));
                let alive: Vec<Item> = (0..editor.pod_len())
                    .map(Item::Pod)
                    .chain((0..editor.added.len()).map(Item::Added))
                    .filter(|&i| !editor.is_removed(i))
                    .collect();
                let pick = (!alive.is_empty()).then(|| alive[next(alive.len())]);
                match (next(5), pick) {
                    (0, _) | (_, None) => editor.push(var(&name, &format!("p{step}"))),
                    (1, Some(item)) => editor.insert(Anchor::Before(item), var(&name, "i")),
                    // The planner never renames an item.
                    (2, Some(item)) => {
                        let same = editor.get(item).name.clone();
                        editor.replace(item, var(&same, "r"))
                    }
                    (3, Some(item)) => editor.set_value(item, format!("s{step}")),
                    (_, Some(item)) => editor.remove(item),
                }
                let current = editor.current();
                assert_eq!(editor.len(), current.len());
                let first = current.iter().position(|v| v.name == name);
                assert_eq!(editor.position(&name).map(|i| editor.index(i)), first);
                let all: Vec<usize> = editor
                    .all_named(&name)
                    .into_iter()
                    .map(|i| editor.index(i))
                    .collect();
                let scan: Vec<usize> = (0..current.len())
                    .filter(|&i| current[i].name == name)
                    .collect();
                assert_eq!(all, scan);
            }
            let expected = editor.current();
            let mut doc = serde_json::json!({"spec": {"containers": [container]}});
            json_patch::patch(&mut doc, &ops.operations().unwrap()).unwrap();
            let replayed: Vec<EnvVar> =
                serde_json::from_value(doc["spec"]["containers"][0]["env"].clone())
                    .unwrap_or_default();
            assert_eq!(replayed, expected, "round {round}");
        }
    }
}
