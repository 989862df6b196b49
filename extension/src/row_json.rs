//! Turning a tracked table's tuples into the jsonb the change log stores: the key
//! (primary-key columns), the whole row, or just the columns an update changed.
//!
//! Values are converted by Postgres's own `to_jsonb`, so the log shows exactly what
//! `SELECT to_jsonb(t) FROM t` would (timestamps in ISO form, numerics as numbers,
//! nested arrays and composites as JSON). Dropped columns are skipped; the
//! `_livesync_version` and `_livesync_clocks` columns are metadata and never
//! appear in a key, row or delta.

use crate::error::LivesyncError;
use pgrx::pg_sys;
use std::ffi::CStr;

pub const VERSION_COLUMN: &CStr = c"_livesync_version";
pub const CLOCKS_COLUMN: &CStr = c"_livesync_clocks";

/// Per-statement encoder for one relation's tuples. Built once per trigger call,
/// so it always reflects the table's current columns and primary key.
pub struct RowEncoder {
    tupdesc: pg_sys::TupleDesc,
    /// 0-based indexes of the primary-key columns.
    key_columns: Vec<usize>,
    /// 0-based index of `_livesync_version`.
    version_column: usize,
    /// 0-based index of `_livesync_clocks`.
    clocks_column: Option<usize>,
    /// Column names as `text` datums, by 0-based index (null for dropped columns).
    names: Vec<pg_sys::Datum>,
    /// `to_jsonb(<table row type>)`, with an expression attached so it knows its input type.
    to_jsonb: pg_sys::FmgrInfo,
    /// Names to delete from a whole row to leave only its key.
    non_key_names: pg_sys::Datum,
    /// `{_livesync_version, _livesync_clocks}`: deleted from whole rows.
    metadata_names: pg_sys::Datum,
    /// The last update's unchanged columns and their names as `text[]`: the rows of
    /// one statement usually change the same columns, so the array is built once.
    last_unchanged: Option<(Vec<usize>, pg_sys::Datum)>,
}

impl RowEncoder {
    /// # Safety
    /// `rel` must be an open relation that stays open for the encoder's lifetime.
    pub unsafe fn new(rel: pg_sys::Relation) -> Result<Self, LivesyncError> {
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

            let mut names = Vec::with_capacity(natts);
            let mut version_column = None;
            let mut clocks_column = None;
            let mut non_key = Vec::new();
            for i in 0..natts {
                let att = attr(tupdesc, i);
                if att.attisdropped {
                    names.push(pg_sys::Datum::from(0usize));
                    continue;
                }
                let name = CStr::from_ptr(att.attname.data.as_ptr());
                let text = pg_sys::Datum::from(pg_sys::cstring_to_text(name.as_ptr()));
                if name == VERSION_COLUMN && att.atttypid == pg_sys::INT8OID {
                    version_column = Some(i);
                }
                if name == CLOCKS_COLUMN {
                    clocks_column = Some(i);
                }
                if !key_columns.contains(&i) {
                    non_key.push(text);
                }
                names.push(text);
            }
            let version_column =
                version_column.ok_or_else(|| LivesyncError::NoVersionColumn(relname()))?;

            let mut metadata = vec![names[version_column]];
            metadata.extend(clocks_column.map(|i| names[i]));
            let metadata_names = text_array(&metadata);
            let non_key_names = text_array(&non_key);

            // to_jsonb(anyelement) asks its call expression for the argument's type;
            // give it one that says "this table's row type".
            let mut to_jsonb = std::mem::zeroed::<pg_sys::FmgrInfo>();
            pg_sys::fmgr_info(to_jsonb_oid(), &mut to_jsonb);
            let arg = pg_sys::makeNullConst((*(*rel).rd_rel).reltype, -1, pg_sys::InvalidOid);
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

            Ok(RowEncoder {
                tupdesc,
                key_columns,
                version_column,
                clocks_column,
                names,
                to_jsonb,
                non_key_names,
                metadata_names,
                last_unchanged: None,
            })
        }
    }

    /// The whole row as jsonb, `_livesync_version` included.
    ///
    /// # Safety
    /// `slot` must hold a tuple of this encoder's relation.
    pub unsafe fn whole(&mut self, slot: *mut pg_sys::TupleTableSlot) -> pg_sys::Datum {
        unsafe {
            let row = pg_sys::ExecFetchSlotHeapTupleDatum(slot);
            pg_sys::FunctionCall1Coll(&mut self.to_jsonb, pg_sys::InvalidOid, row)
        }
    }

    /// The key object of a whole-row jsonb.
    pub unsafe fn key_of(&self, whole: pg_sys::Datum) -> pg_sys::Datum {
        unsafe { jsonb_delete_keys(whole, self.non_key_names) }
    }

    /// A whole-row jsonb without the metadata columns: what an insert or delete logs.
    pub unsafe fn without_metadata(&self, whole: pg_sys::Datum) -> pg_sys::Datum {
        unsafe { jsonb_delete_keys(whole, self.metadata_names) }
    }

    /// Both sides of an update, reduced to the columns whose stored value changed.
    pub unsafe fn changed_only(
        &mut self,
        old_slot: *mut pg_sys::TupleTableSlot,
        new_slot: *mut pg_sys::TupleTableSlot,
        old_whole: pg_sys::Datum,
        new_whole: pg_sys::Datum,
    ) -> (pg_sys::Datum, pg_sys::Datum) {
        unsafe {
            let unchanged: Vec<usize> = (0..self.names.len())
                .filter(|&i| {
                    i != self.version_column
                        && Some(i) != self.clocks_column
                        && !attr(self.tupdesc, i).attisdropped
                        && self.same_value(old_slot, new_slot, i)
                })
                .collect();
            let drop = match &self.last_unchanged {
                Some((columns, names)) if *columns == unchanged => *names,
                _ => {
                    let mut names: Vec<_> = unchanged.iter().map(|&i| self.names[i]).collect();
                    names.push(self.names[self.version_column]);
                    names.extend(self.clocks_column.map(|i| self.names[i]));
                    let names = text_array(&names);
                    self.last_unchanged = Some((unchanged, names));
                    names
                }
            };
            (
                jsonb_delete_keys(old_whole, drop),
                jsonb_delete_keys(new_whole, drop),
            )
        }
    }

    /// Whether two tuples of this relation have the same primary key.
    pub unsafe fn same_key(
        &self,
        a: *mut pg_sys::TupleTableSlot,
        b: *mut pg_sys::TupleTableSlot,
    ) -> bool {
        self.key_columns
            .iter()
            .all(|&i| unsafe { self.same_value(a, b, i) })
    }

    /// The row's `_livesync_version`.
    pub unsafe fn version(&self, slot: *mut pg_sys::TupleTableSlot) -> Option<i64> {
        unsafe {
            let (value, null) = column(slot, self.version_column);
            (!null).then(|| value.value() as i64)
        }
    }

    /// Binary (image) equality: a value rewritten to an equal but differently
    /// stored form counts as changed, which is what a replica needs to see.
    unsafe fn same_value(
        &self,
        a: *mut pg_sys::TupleTableSlot,
        b: *mut pg_sys::TupleTableSlot,
        i: usize,
    ) -> bool {
        unsafe {
            let (va, na) = column(a, i);
            let (vb, nb) = column(b, i);
            match (na, nb) {
                (true, true) => true,
                (false, false) => {
                    let att = attr(self.tupdesc, i);
                    same_image(va, vb, att.attbyval, att.attlen)
                }
                _ => false,
            }
        }
    }
}

/// Whether two non-null values of one type are stored identically (Postgres's
/// `datum_image_eq`, which pgrx does not bind).
unsafe fn same_image(a: pg_sys::Datum, b: pg_sys::Datum, by_value: bool, len: i16) -> bool {
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
unsafe fn primary_key_columns(rel: pg_sys::Relation) -> Vec<usize> {
    unsafe {
        for oid in crate::catalog::index_oids(rel) {
            let index = pg_sys::RelationIdGetRelation(oid);
            let form = (*index).rd_index;
            let columns: Vec<usize> = if (*form).indisprimary {
                let keys = (*form).indkey.values.as_slice((*form).indnkeyatts as usize);
                keys.iter().map(|&attnum| (attnum - 1) as usize).collect()
            } else {
                Vec::new()
            };
            pg_sys::RelationClose(index);
            if !columns.is_empty() {
                return columns;
            }
        }
        Vec::new()
    }
}

unsafe fn attr<'a>(tupdesc: pg_sys::TupleDesc, i: usize) -> &'a pg_sys::FormData_pg_attribute {
    unsafe { &*(*tupdesc).attrs.as_ptr().add(i) }
}

/// Column `i` (0-based) of a slot whose attributes have been deformed.
unsafe fn column(slot: *mut pg_sys::TupleTableSlot, i: usize) -> (pg_sys::Datum, bool) {
    unsafe {
        if ((*slot).tts_nvalid as usize) <= i {
            pg_sys::slot_getsomeattrs_int(slot, (i + 1) as i32);
        }
        (*(*slot).tts_values.add(i), *(*slot).tts_isnull.add(i))
    }
}

unsafe fn text_array(items: &[pg_sys::Datum]) -> pg_sys::Datum {
    unsafe {
        let array = pg_sys::construct_array(
            items.as_ptr().cast_mut(),
            items.len() as i32,
            pg_sys::TEXTOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as _,
        );
        pg_sys::Datum::from(array)
    }
}

unsafe fn jsonb_delete_keys(jsonb: pg_sys::Datum, names: pg_sys::Datum) -> pg_sys::Datum {
    unsafe {
        pgrx::direct_function_call_as_datum(pg_sys::jsonb_delete_array, &[Some(jsonb), Some(names)])
            .expect("jsonb - text[] never returns NULL for non-NULL input")
    }
}

fn to_jsonb_oid() -> pg_sys::Oid {
    pg_sys::Oid::from(pg_sys::F_TO_JSONB)
}
