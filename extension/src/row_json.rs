//! Turning a tracked table's tuples into the jsonb the change log stores: the key
//! (primary-key columns), the whole row, or just the columns an update changed.
//!
//! Objects are built column by column with Postgres's jsonb builder, so an update
//! that changes one column encodes three values (key, old, new), not two whole rows.
//! Values render exactly as `to_jsonb` renders them: integers, booleans and text are
//! converted directly (the same JSON `to_jsonb` gives), every other type through
//! `to_jsonb` itself (timestamps in ISO form, numerics as numbers, arrays and
//! composites as JSON). Dropped columns are skipped; the `_livesync_version` and
//! `_livesync_clocks` columns are metadata and never appear in a key, row or delta.

use crate::catalog::Lent;
use crate::error::LivesyncError;
use crate::pg_resources::{ContextSize, OpenRelation, OwnedMemoryContext};
use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;

pub const VERSION_COLUMN: &CStr = c"_livesync_version";
pub const CLOCKS_COLUMN: &CStr = c"_livesync_clocks";

/// How one column's values become JSON.
enum ColumnKind {
    /// Dropped, or livesync's metadata: never encoded.
    Skipped,
    Int2,
    Int4,
    Int8,
    Bool,
    /// `text` / `varchar` / `char(n)`: the string itself.
    Text,
    /// Anything else: `to_jsonb(value)`, with an expression attached so it knows
    /// the argument's type.
    ToJsonb(Box<pg_sys::FmgrInfo>),
}

/// Encoder for one relation's tuples. Kept per backend (`RowEncoder::take` /
/// `give_back`) and dropped when the relation's relcache entry is invalidated, which
/// any change to its columns or primary key causes.
pub struct RowEncoder {
    relid: pg_sys::Oid,
    tupdesc: pg_sys::TupleDesc,
    /// Holds what the encoder allocates in Postgres memory (the `to_jsonb` call
    /// expressions, the slots); kept only to be deleted with the encoder.
    _context: OwnedMemoryContext,
    /// 0-based indexes of the primary-key columns.
    key_columns: Vec<usize>,
    /// 0-based index of `_livesync_version`.
    version_column: usize,
    kinds: Vec<ColumnKind>,
    /// The columns the last update given to `push_changed` changed (kept to reuse
    /// its allocation; `push_unchanged` reads them).
    changed: Vec<usize>,
    /// Two slots for reading the relation's transition tables, made once: on a
    /// descriptor copy of the encoder's own, so they pin nothing across
    /// transactions.
    slots: [*mut pg_sys::TupleTableSlot; 2],
}

thread_local! {
    static ENCODERS: RefCell<HashMap<pg_sys::Oid, RowEncoder>> = RefCell::new(HashMap::new());
}

/// Registers the invalidation callback; called once per process from `_PG_init`.
pub fn init() {
    // SAFETY: `forget` is a guarded callback of the type the relcache calls, and
    // `_PG_init` registers it once per process.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0usize)) };
}

/// # Safety
/// Called by Postgres's invalidation processing only (registered in `init`).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    ENCODERS.with(|encoders| crate::catalog::forget_relation(encoders, relid));
}

impl RowEncoder {
    /// The backend's encoder for `rel`, built when there is none or the relation's
    /// descriptor changed since. Hand it back with `give_back` for the next
    /// statement; an encoder dropped instead (an error unwound) is simply rebuilt.
    ///
    /// # Safety
    /// `rel` must be an open relation that stays open while the encoder is used.
    pub unsafe fn take(rel: pg_sys::Relation) -> Result<Lent<RowEncoder>, LivesyncError> {
        // SAFETY: `rel` is open (the caller's contract).
        let (relid, tupdesc) = unsafe { ((*rel).rd_id, (*rel).rd_att) };
        let cached = ENCODERS.with(|encoders| encoders.borrow_mut().remove(&relid));
        let encoder = match cached {
            Some(encoder) if encoder.tupdesc == tupdesc => encoder,
            // SAFETY: `rel` is open (the caller's contract).
            _ => unsafe { RowEncoder::new(rel)? },
        };
        Ok(Lent::new(encoder))
    }

    /// Keeps a lent encoder for the next statement, unless an invalidation arrived
    /// while it was out.
    pub fn give_back(lent: Lent<RowEncoder>) {
        if let Some(encoder) = lent.give_back() {
            ENCODERS.with(|encoders| encoders.borrow_mut().insert(encoder.relid, encoder));
        }
    }

    /// # Safety
    /// `rel` must be an open relation.
    unsafe fn new(rel: pg_sys::Relation) -> Result<Self, LivesyncError> {
        // SAFETY: CacheMemoryContext lives as long as the backend. The context is
        // owned before anything is built in it: an `Err`, and a Postgres ERROR raised
        // while building (unwinding through here), both drop it and so delete it,
        // which nothing else would (no abort resets CacheMemoryContext).
        let context = unsafe {
            OwnedMemoryContext::new(
                pg_sys::CacheMemoryContext,
                c"livesync row encoder",
                ContextSize::Small,
            )
        };
        // SAFETY: `rel` is open (the caller's contract).
        unsafe { RowEncoder::build(rel, context) }
    }

    /// Builds the encoder of `rel` in `context`, which it then owns.
    ///
    /// # Safety
    /// `rel` must be an open relation.
    unsafe fn build(
        rel: pg_sys::Relation,
        context: OwnedMemoryContext,
    ) -> Result<Self, LivesyncError> {
        // Everything Postgres allocates for the encoder goes into its context; the
        // switch ends before `context` moves into the encoder, or is dropped.
        let in_context = context.switch_to();
        // SAFETY: `rel` is open (the caller's contract), so its descriptor and
        // relcache entry are valid to read throughout.
        unsafe {
            let tupdesc = (*rel).rd_att;
            let natts = (*tupdesc).natts as usize;
            let relname = || {
                CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned()
            };

            let key_columns = primary_key_columns(rel);
            if key_columns.is_empty() {
                return Err(LivesyncError::NoPrimaryKey(relname()));
            }

            let mut version_column = None;
            let mut kinds = Vec::with_capacity(natts);
            for i in 0..natts {
                let att = attr(tupdesc, i);
                let name = CStr::from_ptr(att.attname.data.as_ptr());
                if is_version_column(att) {
                    version_column = Some(i);
                }
                let metadata = name == VERSION_COLUMN || name == CLOCKS_COLUMN;
                kinds.push(if att.attisdropped || metadata {
                    ColumnKind::Skipped
                } else {
                    column_kind(att.atttypid)
                });
            }
            let version_column =
                version_column.ok_or_else(|| LivesyncError::NoVersionColumn(relname()))?;
            // Allocated in the encoder's context (current while it is built). With the
            // constraints: they carry the values of columns added after a row was stored.
            let slot_desc = pg_sys::CreateTupleDescCopyConstr(tupdesc);
            let slots = [0, 1]
                .map(|_| pg_sys::MakeSingleTupleTableSlot(slot_desc, &pg_sys::TTSOpsMinimalTuple));
            drop(in_context);
            Ok(RowEncoder {
                relid: (*rel).rd_id,
                tupdesc,
                _context: context,
                key_columns,
                version_column,
                kinds,
                changed: Vec::new(),
                slots,
            })
        }
    }

    /// The encoder's two empty slots for reading tuples of its relation (clear them
    /// after use: they outlive the statement).
    pub fn slots(&self) -> [*mut pg_sys::TupleTableSlot; 2] {
        self.slots
    }

    /// The key object (the primary-key columns) as a jsonb value of its own.
    ///
    /// # Safety
    /// `slot` must hold a tuple of this encoder's relation.
    pub unsafe fn key(&mut self, slot: *mut pg_sys::TupleTableSlot) -> pg_sys::Datum {
        // SAFETY: `slot` holds a tuple of this relation (the caller's contract).
        unsafe {
            let mut builder = JsonbBuilder::new();
            self.push_key(&mut builder, slot);
            builder.finish()
        }
    }

    /// Pushes the key object: the primary-key columns.
    ///
    /// # Safety
    /// `slot` must hold a tuple of this encoder's relation.
    pub unsafe fn push_key(&mut self, out: &mut JsonbBuilder, slot: *mut pg_sys::TupleTableSlot) {
        // SAFETY: `slot` holds a tuple of this relation (the caller's contract), and
        // the key columns are among its columns.
        unsafe {
            out.begin_object();
            for k in 0..self.key_columns.len() {
                let i = self.key_columns[k];
                self.push_column(out, slot, i);
            }
            out.end_object();
        }
    }

    /// Pushes the whole row without the metadata columns: what an insert or delete
    /// logs.
    ///
    /// # Safety
    /// `slot` must hold a tuple of this encoder's relation.
    pub unsafe fn push_row(&mut self, out: &mut JsonbBuilder, slot: *mut pg_sys::TupleTableSlot) {
        // SAFETY: `slot` holds a tuple of this relation (the caller's contract), which
        // has a column for every kind.
        unsafe {
            out.begin_object();
            for i in 0..self.kinds.len() {
                if !matches!(self.kinds[i], ColumnKind::Skipped) {
                    self.push_column(out, slot, i);
                }
            }
            out.end_object();
        }
    }

    /// Pushes both sides of an update, reduced to the columns whose stored value
    /// changed: the old object, then the new one.
    ///
    /// # Safety
    /// Both slots must hold tuples of this encoder's relation.
    pub unsafe fn push_changed(
        &mut self,
        out: &mut JsonbBuilder,
        old_slot: *mut pg_sys::TupleTableSlot,
        new_slot: *mut pg_sys::TupleTableSlot,
    ) {
        // SAFETY: both slots hold tuples of this relation (the caller's contract),
        // which have a column for every kind.
        unsafe {
            let mut changed = std::mem::take(&mut self.changed);
            changed.clear();
            for i in 0..self.kinds.len() {
                if !matches!(self.kinds[i], ColumnKind::Skipped)
                    && !self.same_value(old_slot, new_slot, i)
                {
                    changed.push(i);
                }
            }
            for slot in [old_slot, new_slot] {
                out.begin_object();
                for &i in &changed {
                    self.push_column(out, slot, i);
                }
                out.end_object();
            }
            self.changed = changed;
        }
    }

    /// Pushes the object of an update's filter columns that it did not change, with
    /// their value in `slot` (the new row): `columns` are the table's filter columns
    /// (0-based indexes; livesync's own columns are passed over). Call right after
    /// `push_changed` for the same update: it skips the columns found changed there,
    /// whose values old and new already hold.
    ///
    /// # Safety
    /// `slot` must hold a tuple of this encoder's relation.
    pub unsafe fn push_unchanged(
        &mut self,
        out: &mut JsonbBuilder,
        slot: *mut pg_sys::TupleTableSlot,
        columns: &[usize],
    ) {
        // SAFETY: `slot` holds a tuple of this relation (the caller's contract), and
        // only indexes below the number of its columns are read.
        unsafe {
            out.begin_object();
            for &i in columns {
                if i < self.kinds.len()
                    && !matches!(self.kinds[i], ColumnKind::Skipped)
                    && !self.changed.contains(&i)
                {
                    self.push_column(out, slot, i);
                }
            }
            out.end_object();
        }
    }

    /// Adds column `i` of the tuple in `slot` to the object `out` is building.
    /// Everything pushed is copied out of the slot: the builder outlives the tuple.
    ///
    /// # Safety
    /// `slot` must hold a tuple of this encoder's relation, and `i` be one of its
    /// columns that is not skipped.
    unsafe fn push_column(
        &mut self,
        out: &mut JsonbBuilder,
        slot: *mut pg_sys::TupleTableSlot,
        i: usize,
    ) {
        // SAFETY: column `i` of `slot` exists and is of the type its kind was made
        // for (the caller's contract; the encoder is rebuilt when the descriptor
        // changes), so each arm reads the datum as what it is: int2/int4/int8/bool by
        // value, text a varlena, anything else through to_jsonb with its type. The
        // attribute name lives in the relcache's descriptor, which outlives the
        // builder (a statement).
        unsafe {
            let att = attr(self.tupdesc, i);
            let name = att.attname.data.as_ptr();
            let (datum, null) = column(slot, i);
            let mut value = std::mem::zeroed::<pg_sys::JsonbValue>();
            if null {
                value.type_ = pg_sys::jbvType::jbvNull;
                out.key_value(name, &mut value);
                return;
            }
            match &mut self.kinds[i] {
                ColumnKind::Skipped => unreachable!("skipped columns are never encoded"),
                ColumnKind::Int2 => numeric(&mut value, i64::from(datum.value() as i16)),
                ColumnKind::Int4 => numeric(&mut value, i64::from(datum.value() as i32)),
                ColumnKind::Int8 => numeric(&mut value, datum.value() as i64),
                ColumnKind::Bool => {
                    value.type_ = pg_sys::jbvType::jbvBool;
                    value.val.boolean = datum.value() != 0;
                }
                ColumnKind::Text => {
                    let text = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
                    let bytes = pgrx::varlena::varlena_to_byte_slice(text);
                    value.type_ = pg_sys::jbvType::jbvString;
                    value.val.string.len = bytes.len() as i32;
                    value.val.string.val = out.copy_bytes(bytes);
                }
                ColumnKind::ToJsonb(to_jsonb) => {
                    // A fresh jsonb value of its own (not the slot's memory), which the
                    // builder refers into until it finishes.
                    let jsonb =
                        pg_sys::FunctionCall1Coll(&mut **to_jsonb, pg_sys::InvalidOid, datum);
                    let jsonb =
                        pg_sys::pg_detoast_datum(jsonb.cast_mut_ptr()).cast::<pg_sys::Jsonb>();
                    value.type_ = pg_sys::jbvType::jbvBinary;
                    value.val.binary.data = &mut (*jsonb).root;
                    value.val.binary.len = pgrx::varlena::varsize_any(jsonb.cast()) as i32;
                    out.add_size(value.val.binary.len as usize);
                }
            }
            out.key_value(name, &mut value);
        }
    }

    /// Whether two tuples of this relation have the same primary key.
    ///
    /// # Safety
    /// Both slots must hold tuples of this encoder's relation.
    pub unsafe fn same_key(
        &self,
        a: *mut pg_sys::TupleTableSlot,
        b: *mut pg_sys::TupleTableSlot,
    ) -> bool {
        self.key_columns
            .iter()
            // SAFETY: both slots hold tuples of this relation (the caller's contract).
            .all(|&i| unsafe { self.same_value(a, b, i) })
    }

    /// The relation whose rows this encoder encodes.
    pub fn relid(&self) -> pg_sys::Oid {
        self.relid
    }

    /// 0-based index of `_livesync_version`.
    pub fn version_column(&self) -> usize {
        self.version_column
    }

    /// The row's `_livesync_version`.
    ///
    /// # Safety
    /// `slot` must hold a tuple of this encoder's relation.
    pub unsafe fn version(&self, slot: *mut pg_sys::TupleTableSlot) -> Option<i64> {
        // SAFETY: `slot` holds a tuple of this relation (the caller's contract), whose
        // version column is a bigint, by value.
        unsafe {
            let (value, null) = column(slot, self.version_column);
            (!null).then(|| value.value() as i64)
        }
    }

    /// Binary (image) equality: a value rewritten to an equal but differently
    /// stored form counts as changed, which is what a replica needs to see.
    ///
    /// # Safety
    /// Both slots must hold tuples of this encoder's relation, and `i` be one of its
    /// columns.
    unsafe fn same_value(
        &self,
        a: *mut pg_sys::TupleTableSlot,
        b: *mut pg_sys::TupleTableSlot,
        i: usize,
    ) -> bool {
        // SAFETY: column `i` exists in both tuples (the caller's contract), and two
        // non-null values of it are compared with its own length and by-value flag.
        unsafe {
            let att = attr(self.tupdesc, i);
            same_column(column(a, i), column(b, i), att.attbyval, att.attlen)
        }
    }
}

/// Whether two column values `(datum, is_null)` of one type are the same: both NULL,
/// or both stored identically.
///
/// # Safety
/// Both values must be of one type whose `typbyval` and `typlen` are `by_value` and
/// `len`.
unsafe fn same_column(
    (va, na): (pg_sys::Datum, bool),
    (vb, nb): (pg_sys::Datum, bool),
    by_value: bool,
    len: i16,
) -> bool {
    match (na, nb) {
        (true, true) => true,
        // SAFETY: both non-null values of the one type (the caller's contract).
        (false, false) => unsafe { same_image(va, vb, by_value, len) },
        _ => false,
    }
}

/// Whether two non-null values of one type are stored identically (Postgres's
/// `datum_image_eq`, which pgrx does not bind).
///
/// # Safety
/// `a` and `b` must be non-null values of one type, whose `typbyval` and `typlen`
/// are `by_value` and `len`.
unsafe fn same_image(a: pg_sys::Datum, b: pg_sys::Datum, by_value: bool, len: i16) -> bool {
    // SAFETY: by the caller's contract each pointer type read matches the type's
    // storage: `len` bytes for fixed-length types, a NUL-terminated string for
    // cstring (-2), a varlena otherwise (whose size its header gives).
    unsafe {
        if by_value {
            return a == b;
        }
        if len > 0 {
            let (a, b) = (a.cast_mut_ptr::<u8>(), b.cast_mut_ptr::<u8>());
            return std::slice::from_raw_parts(a, len as usize)
                == std::slice::from_raw_parts(b, len as usize);
        }
        if len == -2 {
            return CStr::from_ptr(a.cast_mut_ptr()) == CStr::from_ptr(b.cast_mut_ptr());
        }
        // varlena: an update that did not touch a toasted column keeps the very same
        // toast pointer, so compare the stored bytes before detoasting anything.
        let (ra, rb) = (
            a.cast_mut_ptr::<pg_sys::varlena>(),
            b.cast_mut_ptr::<pg_sys::varlena>(),
        );
        let (sa, sb) = (
            pgrx::varlena::varsize_any(ra),
            pgrx::varlena::varsize_any(rb),
        );
        if sa == sb
            && std::slice::from_raw_parts(ra.cast::<u8>(), sa)
                == std::slice::from_raw_parts(rb.cast::<u8>(), sb)
        {
            return true;
        }
        if pg_sys::toast_raw_datum_size(a) != pg_sys::toast_raw_datum_size(b) {
            return false;
        }
        let da = pg_sys::pg_detoast_datum_packed(ra);
        let db = pg_sys::pg_detoast_datum_packed(rb);
        pgrx::varlena::varlena_to_byte_slice(da) == pgrx::varlena::varlena_to_byte_slice(db)
    }
}

/// 0-based indexes of the primary key's columns, in the key's order. Read from the
/// index itself: the relcache's primary-key bitmap leaves out DEFERRABLE keys.
///
/// # Safety
/// `rel` must be an open relation, locked.
unsafe fn primary_key_columns(rel: pg_sys::Relation) -> Vec<usize> {
    // SAFETY: `rel` is open (the caller's contract); its indexes cannot be dropped
    // while it is locked, so each one's relcache entry, opened without a lock of its
    // own, is an index's with a valid `rd_index` of `indnkeyatts` key columns.
    unsafe {
        for oid in crate::catalog::index_oids(rel) {
            let Some(index) = OpenRelation::unlocked(oid) else {
                continue;
            };
            let form = (*index.as_ptr()).rd_index;
            let columns: Vec<usize> = if (*form).indisprimary {
                let keys = (*form).indkey.values.as_slice((*form).indnkeyatts as usize);
                keys.iter().map(|&attnum| (attnum - 1) as usize).collect()
            } else {
                Vec::new()
            };
            drop(index);
            if !columns.is_empty() {
                return columns;
            }
        }
        Vec::new()
    }
}

/// Whether a column is livesync's `_livesync_version` (a live `bigint` of that name).
pub fn is_version_column(att: &pg_sys::FormData_pg_attribute) -> bool {
    !att.attisdropped
        && att.atttypid == pg_sys::INT8OID
        // SAFETY: attname is a NUL-terminated NameData.
        && unsafe { CStr::from_ptr(att.attname.data.as_ptr()) } == VERSION_COLUMN
}

/// A copy of `tuple` with the int8 column `attnum` (1-based) set to `value`: how
/// versions are stamped and re-stamped and how a log row gets its commit sequence.
///
/// # Safety
/// `tuple` is a valid tuple of `tupdesc`, whose column `attnum` is an int8.
pub unsafe fn with_int8(
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
    attnum: i32,
    value: i64,
) -> pg_sys::HeapTuple {
    let mut columns = [attnum];
    let mut values = [pg_sys::Datum::from(value)];
    let mut nulls = [false];
    // SAFETY: `tuple` is a tuple of `tupdesc` whose column `attnum` takes an int8 by
    // value (the caller's contract); the arrays describe that one column.
    unsafe {
        pg_sys::heap_modify_tuple_by_cols(
            tuple,
            tupdesc,
            1,
            columns.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
        )
    }
}

/// Column `i` (0-based) of a tuple descriptor.
///
/// # Safety
/// `tupdesc` must be a valid descriptor with more than `i` columns, that outlives
/// the reference (`'a`).
pub unsafe fn attr<'a>(tupdesc: pg_sys::TupleDesc, i: usize) -> &'a pg_sys::FormData_pg_attribute {
    // SAFETY: `attrs` is the descriptor's trailing array of `natts` entries, and
    // `i < natts` (the caller's contract).
    unsafe { &*(*tupdesc).attrs.as_ptr().add(i) }
}

/// Column `i` (0-based) of the tuple in a slot, deformed as far as needed.
///
/// # Safety
/// `slot` must hold a tuple with more than `i` columns.
pub unsafe fn column(slot: *mut pg_sys::TupleTableSlot, i: usize) -> (pg_sys::Datum, bool) {
    // SAFETY: after slot_getsomeattrs_int(i + 1) the slot's value and null arrays
    // hold at least `i + 1` valid entries (the tuple has that many columns).
    unsafe {
        if ((*slot).tts_nvalid as usize) <= i {
            pg_sys::slot_getsomeattrs_int(slot, (i + 1) as i32);
        }
        (*(*slot).tts_values.add(i), *(*slot).tts_isnull.add(i))
    }
}

fn column_kind(type_oid: pg_sys::Oid) -> ColumnKind {
    match type_oid {
        pg_sys::INT2OID => ColumnKind::Int2,
        pg_sys::INT4OID => ColumnKind::Int4,
        pg_sys::INT8OID => ColumnKind::Int8,
        pg_sys::BOOLOID => ColumnKind::Bool,
        // char(n) too: stored padded, and rendered as stored.
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => ColumnKind::Text,
        // SAFETY: fmgr_info fills the zeroed FmgrInfo for a built-in function, and
        // the expression built for it (in the current memory context, the
        // encoder's) is a well-formed FuncExpr with one Const argument of the type.
        _ => unsafe {
            // to_jsonb(anyelement) asks its call expression for the argument's
            // type; give it one that says "this column's type".
            let mut to_jsonb = Box::new(std::mem::zeroed::<pg_sys::FmgrInfo>());
            pg_sys::fmgr_info(pg_sys::Oid::from(pg_sys::F_TO_JSONB), &mut *to_jsonb);
            let arg = pg_sys::makeNullConst(type_oid, -1, pg_sys::InvalidOid);
            let args = pg_sys::lappend(std::ptr::null_mut(), arg.cast());
            let call = pg_sys::makeFuncExpr(
                to_jsonb.fn_oid,
                pg_sys::JSONBOID,
                args,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
            );
            to_jsonb.fn_expr = call.cast();
            ColumnKind::ToJsonb(to_jsonb)
        },
    }
}

/// An integer as a JSON number (what `to_jsonb` makes of it).
fn numeric(value: &mut pg_sys::JsonbValue, n: i64) {
    value.type_ = pg_sys::jbvType::jbvNumeric;
    // SAFETY: int64_to_numeric takes any i64 and pallocs its result.
    value.val.numeric = unsafe { pg_sys::int64_to_numeric(n) };
}

/// A jsonb value under construction: objects and arrays nested to any depth,
/// serialised once by `finish`. Pushed strings are copied into the current memory
/// context, so a builder can collect values from many tuples in turn.
pub struct JsonbBuilder {
    state: *mut pg_sys::JsonbParseState,
    /// What the last push returned: after the outermost end token, the whole value.
    last: *mut pg_sys::JsonbValue,
    /// Roughly how many bytes the finished value will take.
    size: usize,
}

impl JsonbBuilder {
    pub fn new() -> Self {
        JsonbBuilder {
            state: std::ptr::null_mut(),
            last: std::ptr::null_mut(),
            size: 0,
        }
    }

    /// Roughly how many bytes the value pushed so far will take once serialised.
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn begin_object(&mut self) {
        self.token(
            pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT,
            std::ptr::null_mut(),
        );
    }

    pub fn end_object(&mut self) {
        self.token(
            pg_sys::JsonbIteratorToken::WJB_END_OBJECT,
            std::ptr::null_mut(),
        );
    }

    pub fn begin_array(&mut self) {
        self.token(
            pg_sys::JsonbIteratorToken::WJB_BEGIN_ARRAY,
            std::ptr::null_mut(),
        );
    }

    pub fn end_array(&mut self) {
        self.token(
            pg_sys::JsonbIteratorToken::WJB_END_ARRAY,
            std::ptr::null_mut(),
        );
    }

    /// Adds an array element: JSON null.
    pub fn null_element(&mut self) {
        // SAFETY: JsonbValue is a plain C struct, for which all zeroes is valid.
        let mut value = unsafe { std::mem::zeroed::<pg_sys::JsonbValue>() };
        value.type_ = pg_sys::jbvType::jbvNull;
        self.token(pg_sys::JsonbIteratorToken::WJB_ELEM, &mut value);
    }

    /// Adds an array element: an integer.
    pub fn int_element(&mut self, n: i64) {
        // SAFETY: JsonbValue is a plain C struct, for which all zeroes is valid.
        let mut value = unsafe { std::mem::zeroed::<pg_sys::JsonbValue>() };
        numeric(&mut value, n);
        self.token(pg_sys::JsonbIteratorToken::WJB_ELEM, &mut value);
    }

    /// Adds `name: value` to the object being built.
    ///
    /// # Safety
    /// `name` must be NUL-terminated and outlive the builder; `value` a complete
    /// scalar (or binary) JsonbValue.
    unsafe fn key_value(&mut self, name: *const std::ffi::c_char, value: &mut pg_sys::JsonbValue) {
        // SAFETY: `name` is NUL-terminated (the caller's contract), and a string key
        // refers to it rather than copying it, which its lifetime allows.
        unsafe {
            let mut key = std::mem::zeroed::<pg_sys::JsonbValue>();
            key.type_ = pg_sys::jbvType::jbvString;
            key.val.string.len = CStr::from_ptr(name).count_bytes() as i32;
            key.val.string.val = name.cast_mut();
            self.size += key.val.string.len as usize + 16;
            self.token(pg_sys::JsonbIteratorToken::WJB_KEY, &mut key);
            self.token(pg_sys::JsonbIteratorToken::WJB_VALUE, value);
        }
    }

    /// A copy of `bytes` in the current memory context.
    fn copy_bytes(&mut self, bytes: &[u8]) -> *mut std::ffi::c_char {
        self.size += bytes.len();
        // SAFETY: the allocation has room for `bytes.len()` bytes (at least one:
        // palloc(0) is not allowed), copied from a slice that does not overlap it.
        unsafe {
            let copy = pg_sys::palloc(bytes.len().max(1)).cast::<u8>();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), copy, bytes.len());
            copy.cast()
        }
    }

    fn add_size(&mut self, bytes: usize) {
        self.size += bytes;
    }

    fn token(&mut self, token: pg_sys::JsonbIteratorToken::Type, value: *mut pg_sys::JsonbValue) {
        // SAFETY: `state` is the builder's own parse state (null before the first
        // token), and `value` is null for the begin/end tokens that take none and a
        // complete value for the others (the public methods pair them so).
        self.last = unsafe { pg_sys::pushJsonbValue(&mut self.state, token, value) };
    }

    /// The finished value. Call after the outermost `end_object` / `end_array`.
    pub fn finish(self) -> pg_sys::Datum {
        assert!(
            self.state.is_null() && !self.last.is_null(),
            "jsonb builder finished with unclosed containers"
        );
        // SAFETY: after the outermost end token `last` is the whole value, complete.
        unsafe { pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(self.last)) }
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;
