"""NVMe reservations (Base 2.0, "Reservations") as a sans-IO model.

Nothing here touches a queue, a socket or a file: each command is a function from the
namespace's :class:`~nvme_emu.reservations.model.ReservationState` and the issuing host to a
result (status, new state, notifications to queue, commands to abort), so the dispatch code
that owns controllers and log pages applies the effects. That keeps the rules testable from
the specification's tables alone and lets one state serve every controller of the subsystem.

Modules: :mod:`.access` (the type x role x command table and the conflict decision),
:mod:`.model` (Register/Acquire/Release and persistence), :mod:`.report` (Reservation Report
and Reservation Notification layouts), :mod:`.notify` (a controller's notification queue),
:mod:`.host_id` (the Host Identifier feature).
"""
