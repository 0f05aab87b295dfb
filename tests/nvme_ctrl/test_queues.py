"""Create/Delete I/O Submission and Completion Queues, with every validation."""

from __future__ import annotations

import os

import pytest

from ..support.host import Host
from nvme_emu.spec.commands import AdminOpcode, Status
from nvme_emu.spec.features import FeatureId

CQ, SQ = AdminOpcode.CREATE_IO_CQ, AdminOpcode.CREATE_IO_SQ
DEL_CQ, DEL_SQ = AdminOpcode.DELETE_IO_CQ, AdminOpcode.DELETE_IO_SQ


def create_cq(n: Host, qid: int, size: int = 16, *, iv: int = 1, pc: int = 1, base: int | None = None):
    b = n.alloc(size * 16) if base is None else base
    return n.admin(CQ, prp1=b, cdw10=(size - 1) << 16 | qid, cdw11=iv << 16 | 2 | pc)


def create_sq(n: Host, qid: int, cqid: int, size: int = 16, *, pc: int = 1, base: int | None = None):
    b = n.alloc(size * 64) if base is None else base
    return n.admin(SQ, prp1=b, cdw10=(size - 1) << 16 | qid, cdw11=cqid << 16 | pc)


@pytest.fixture
def nq(nvme: Host) -> Host:
    dw0 = nvme.set_queues(3)  # 3 SQs and 3 CQs allowed
    assert dw0 == (2 << 16 | 2)
    return nvme


def test_create_and_delete_pair(nq: Host):
    assert create_cq(nq, 1).status == Status.SUCCESS
    assert create_sq(nq, 1, 1).status == Status.SUCCESS
    assert nq.admin(DEL_SQ, cdw10=1).status == Status.SUCCESS
    assert nq.admin(DEL_CQ, cdw10=1).status == Status.SUCCESS
    # and again, with the same ids
    q = nq.create_pair(1, 16)
    data = os.urandom(512)
    nq.write_ok(1, 1, 0, data)
    assert nq.read_ok(1, 1, 0, 1) == data
    assert q.qid == 1


def test_several_sqs_share_one_cq(nq: Host):
    assert create_cq(nq, 1).status == Status.SUCCESS
    assert create_sq(nq, 1, 1).status == Status.SUCCESS
    assert create_sq(nq, 2, 1).status == Status.SUCCESS
    assert nq.admin(DEL_CQ, cdw10=1).status == Status.INVALID_QUEUE_DELETION
    assert nq.admin(DEL_SQ, cdw10=1).status == Status.SUCCESS
    assert nq.admin(DEL_CQ, cdw10=1).status == Status.INVALID_QUEUE_DELETION  # SQ 2 still there
    assert nq.admin(DEL_SQ, cdw10=2).status == Status.SUCCESS
    assert nq.admin(DEL_CQ, cdw10=1).status == Status.SUCCESS


@pytest.mark.parametrize("qid", [0, 4, 0xFFFF])
def test_create_cq_invalid_qid(nq: Host, qid: int):
    assert create_cq(nq, qid).status == Status.INVALID_QUEUE_IDENTIFIER


@pytest.mark.parametrize("qid", [0, 4, 0xFFFF])
def test_create_sq_invalid_qid(nq: Host, qid: int):
    assert create_cq(nq, 1).status == Status.SUCCESS
    assert create_sq(nq, qid, 1).status == Status.INVALID_QUEUE_IDENTIFIER


def test_create_existing_qid(nq: Host):
    assert create_cq(nq, 2).status == Status.SUCCESS
    assert create_cq(nq, 2).status == Status.INVALID_QUEUE_IDENTIFIER
    assert create_sq(nq, 2, 2).status == Status.SUCCESS
    assert create_sq(nq, 2, 2).status == Status.INVALID_QUEUE_IDENTIFIER


@pytest.mark.parametrize("size", [1, 4097, 65536])
def test_invalid_queue_size(nq: Host, size: int):
    base = nq.alloc(4096)  # never touched: the size check comes first
    assert create_cq(nq, 1, size, base=base).status == Status.INVALID_QUEUE_SIZE
    assert create_cq(nq, 1, 16).status == Status.SUCCESS
    assert create_sq(nq, 1, 1, size, base=base).status == Status.INVALID_QUEUE_SIZE


def test_max_queue_size_accepted(nq: Host):
    assert create_cq(nq, 1, 4096).status == Status.SUCCESS  # MQES + 1
    assert create_sq(nq, 1, 1, 4096).status == Status.SUCCESS


def test_non_contiguous_queue_is_invalid_field(nq: Host):
    assert create_cq(nq, 1, pc=0).status == Status.INVALID_FIELD
    assert create_cq(nq, 1).status == Status.SUCCESS
    assert create_sq(nq, 1, 1, pc=0).status == Status.INVALID_FIELD


@pytest.mark.parametrize("offset", [0x8, 0x200, 0x800])
def test_unaligned_queue_base(nq: Host, offset: int):
    base = nq.alloc(2 * 4096) + offset
    assert create_cq(nq, 1, base=base).status == Status.INVALID_PRP_OFFSET
    assert create_cq(nq, 1).status == Status.SUCCESS
    assert create_sq(nq, 1, 1, base=base).status == Status.INVALID_PRP_OFFSET


def test_queue_outside_guest_memory_is_data_transfer_error(nq: Host):
    assert create_cq(nq, 1, base=0x4000_0000).status == Status.DATA_TRANSFER_ERROR


@pytest.mark.parametrize("iv", [65, 2048, 0xFFFF])
def test_cq_invalid_interrupt_vector(nq: Host, iv: int):
    assert create_cq(nq, 1, iv=iv).status == Status.INVALID_INTERRUPT_VECTOR


def test_cq_last_vector_is_valid(nq: Host):
    assert create_cq(nq, 1, iv=64).status == Status.SUCCESS


@pytest.mark.parametrize("cqid", [0, 2, 3, 0xFFFF])
def test_sq_on_nonexistent_cq(nq: Host, cqid: int):
    assert create_cq(nq, 1).status == Status.SUCCESS
    assert create_sq(nq, 1, cqid).status == Status.COMPLETION_QUEUE_INVALID


def test_delete_cq_with_sq_attached(nq: Host):
    nq.create_pair(1, 16)
    assert nq.admin(DEL_CQ, cdw10=1).status == Status.INVALID_QUEUE_DELETION


@pytest.mark.parametrize("qid", [0, 1, 3, 200])
def test_delete_nonexistent(nq: Host, qid: int):
    assert nq.admin(DEL_SQ, cdw10=qid).status == Status.INVALID_QUEUE_IDENTIFIER
    assert nq.admin(DEL_CQ, cdw10=qid).status == Status.INVALID_QUEUE_IDENTIFIER


def test_deleted_queue_ids_are_free_again(nq: Host):
    nq.create_pair(3, 16)
    assert nq.admin(DEL_SQ, cdw10=3).status == Status.SUCCESS
    assert nq.admin(DEL_SQ, cdw10=3).status == Status.INVALID_QUEUE_IDENTIFIER
    assert nq.admin(DEL_CQ, cdw10=3).status == Status.SUCCESS
    nq.host.queues.pop(3)
    nq.create_pair(3, 8)
    data = os.urandom(4096)
    nq.write_ok(3, 2, 1, data, lba_size=4096)
    assert nq.read_ok(3, 2, 1, 1, lba_size=4096) == data


def test_without_number_of_queues_the_maximum_applies(nvme: Host):
    assert create_cq(nvme, 64, iv=1).status == Status.SUCCESS
    assert create_cq(nvme, 65, iv=1).status == Status.INVALID_QUEUE_IDENTIFIER
    assert nvme.get_features(FeatureId.NUMBER_OF_QUEUES).dw0 == (63 << 16 | 63)
